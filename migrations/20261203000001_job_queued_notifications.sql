-- A job that becomes runnable now (created queued, or handed back by a release, a retry
-- without backoff or a reap) is announced on `job_queued`, so idle workers claim it at once
-- instead of at their next poll. Jobs queued with a backoff are found by the poll. Postgres
-- folds identical notifications within one transaction, so a batch insert wakes workers once.
create function notify_job_queued() returns trigger language plpgsql as $$
begin
    if new.status = 'queued' and new.run_after <= now() then
        perform pg_notify('job_queued', 'any');
    end if;
    return null;
end $$;

create trigger jobs_queued_notify after insert or update of status on jobs
    for each row execute function notify_job_queued();
