-- Every new event and every status change of a job is announced on `job_events` with the
-- job's id, so API processes push events to streams from one LISTEN each instead of polling.
create function notify_job_event() returns trigger language plpgsql as $$
begin
    perform pg_notify('job_events', new.job_id);
    return null;
end $$;

create trigger job_events_notify after insert on job_events
    for each row execute function notify_job_event();

create function notify_job_status() returns trigger language plpgsql as $$
begin
    perform pg_notify('job_events', new.id);
    return null;
end $$;

create trigger jobs_status_notify after update of status on jobs
    for each row when (old.status is distinct from new.status)
    execute function notify_job_status();
