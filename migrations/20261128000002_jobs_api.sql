-- What the jobs API shows besides the queue row: the kind of work (a merge is queued like a
-- fine-tune and runs on the same workers), registered base models, and the per-job records
-- the worker writes under its fence (metrics, checkpoints, artifacts).
alter table jobs add column kind text not null default 'fine_tune'
    check (kind in ('fine_tune', 'merge'));
-- A merge points at the fine-tune whose delta it merges; one merge per fine-tune.
alter table jobs add column parent_id text references jobs(id) on delete cascade;
create unique index jobs_one_merge on jobs (parent_id) where kind = 'merge';
drop index jobs_tenant;
create index jobs_tenant on jobs (tenant_id, kind, created_at desc, id desc);

-- Base models registered by a tenant from object storage (a Hugging Face-layout prefix, or
-- one imported from GGUF into such a prefix). Models under the configured folder are not rows.
create table models (
    id            text not null,
    tenant_id     text not null references tenants(id) on delete cascade,
    object_prefix text not null,
    architecture  text not null,
    config        jsonb not null,
    source        jsonb not null,
    created_at    timestamptz not null default now(),
    primary key (tenant_id, id)
);

-- Training curves: one row per logged step or evaluation. A retried attempt re-logs the steps
-- after its checkpoint; readers keep the latest attempt's point per (kind, step).
create table job_metrics (
    job_id      text not null references jobs(id) on delete cascade,
    attempt     integer not null,
    kind        text not null check (kind in ('train', 'eval')),
    step        integer not null,
    data        jsonb not null,
    created_at  timestamptz not null default now(),
    primary key (job_id, kind, step, attempt)
);

create table job_checkpoints (
    id            text primary key,
    job_id        text not null references jobs(id) on delete cascade,
    attempt       integer not null,
    step          integer not null,
    object_prefix text not null,
    bytes         bigint not null,
    created_at    timestamptz not null default now()
);
create index job_checkpoints_job on job_checkpoints (job_id, step);

create table job_artifacts (
    id          text primary key,
    job_id      text not null references jobs(id) on delete cascade,
    -- `delta` (safetensors + descriptor) or `merged` (a full Hugging Face-layout model).
    kind        text not null check (kind in ('delta', 'merged')),
    name        text not null,
    object_key  text not null,
    bytes       bigint not null,
    sha256      text not null,
    created_at  timestamptz not null default now(),
    unique (job_id, kind, name)
);
