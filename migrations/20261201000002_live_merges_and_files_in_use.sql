-- A fine-tune has at most one live merge (queued, running or succeeded): a failed or cancelled
-- merge no longer blocks asking again.
drop index jobs_one_merge;
create unique index jobs_one_live_merge on jobs (parent_id)
    where kind = 'merge' and status not in ('failed', 'cancelled');
