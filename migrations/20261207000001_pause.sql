-- Pause and resume (OpenAI's): `paused` holds a fine-tune out of the queue with its latest
-- checkpoint until it is resumed; `pause_requested` asks a running job's worker to checkpoint
-- at its next step and hand the job back as `paused` (a lost worker's job is reaped into
-- `paused` too).
alter table jobs add column pause_requested boolean not null default false;
alter table jobs drop constraint jobs_status_check;
alter table jobs add constraint jobs_status_check check (status in
    ('queued', 'running', 'cancelling', 'paused', 'succeeded', 'failed', 'cancelled'));
