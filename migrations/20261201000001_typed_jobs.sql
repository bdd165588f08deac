-- Figures the database filters, sorts or sums become columns instead of paths into JSON (the
-- spec and result keep them too: the job object shows the whole estimate and result). The API
-- writes `model` and `estimate_secs` when it queues a fine-tune; the worker writes
-- `wall_secs` and `trained_tokens` with its fenced completion.
alter table jobs add column model text;
alter table jobs add column estimate_secs double precision;
alter table jobs add column wall_secs double precision;
alter table jobs add column trained_tokens bigint;
update jobs set model = spec->>'model',
                estimate_secs = (spec->'api'->'estimate'->>'duration_secs')::float8,
                wall_secs = (result->>'wall_secs')::float8,
                trained_tokens = (result->>'trained_tokens')::float8::bigint
 where kind = 'fine_tune';
-- Estimates read the latest successful fine-tunes of a model.
create index jobs_history on jobs (model, finished_at desc)
    where kind = 'fine_tune' and status = 'succeeded';

-- Files are validated at upload, before a job can name them: no job waits in
-- `validating_files`, so the status is no longer allowed.
update jobs set status = 'queued' where status = 'validating_files';
alter table jobs drop constraint jobs_status_check;
alter table jobs add constraint jobs_status_check check (status in
    ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled'));
