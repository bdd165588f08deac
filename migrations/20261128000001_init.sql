-- Tenants own everything; API keys are stored as sha256 hashes (shown once at creation).
create table tenants (
    id          text primary key,
    name        text not null,
    created_at  timestamptz not null default now()
);

create table api_keys (
    id          text primary key,
    tenant_id   text not null references tenants(id) on delete cascade,
    -- The key's first characters, to recognise it in listings.
    prefix      text not null,
    key_sha256  text not null unique,
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz
);

create table files (
    id          text primary key,
    tenant_id   text not null references tenants(id) on delete cascade,
    filename    text not null,
    purpose     text not null,
    bytes       bigint not null,
    format      text not null,
    task        text not null,
    rows        bigint not null,
    object_key  text not null,
    created_at  timestamptz not null default now()
);
create index files_tenant on files (tenant_id, created_at desc, id desc);

-- The job queue. A worker claims a queued job whose run_after has passed (SKIP LOCKED), holds
-- it under a lease it renews by heartbeat, and fences every later write by (worker_id, attempt).
create table jobs (
    id               text primary key,
    tenant_id        text not null references tenants(id) on delete cascade,
    status           text not null check (status in
                     ('validating_files', 'queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')),
    spec             jsonb not null,
    idempotency_key  text,
    priority         integer not null default 0,
    attempt          integer not null default 0,
    max_attempts     integer not null default 3 check (max_attempts >= 1),
    run_after        timestamptz not null default now(),
    worker_id        text,
    lease_expires_at timestamptz,
    heartbeat_at     timestamptz,
    cancel_requested boolean not null default false,
    progress         jsonb,
    error            jsonb,
    result           jsonb,
    created_at       timestamptz not null default now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    constraint jobs_idempotency_key unique (tenant_id, idempotency_key)
);
-- What the claim scans: only queued rows, in claim order.
create index jobs_claim on jobs (priority desc, run_after, created_at, id) where status = 'queued';
create index jobs_lease on jobs (lease_expires_at) where status in ('running', 'cancelling');
create index jobs_tenant on jobs (tenant_id, created_at desc, id desc);

create table job_events (
    id          bigserial primary key,
    job_id      text not null references jobs(id) on delete cascade,
    created_at  timestamptz not null default now(),
    level       text not null check (level in ('info', 'warn', 'error')),
    type        text not null,
    message     text not null,
    data        jsonb
);
create index job_events_job on job_events (job_id, id);
