-- Webhooks as OpenAI sends them for fine-tuning: endpoints per tenant, and one delivery per
-- endpoint for each terminal state a fine-tune reaches (written by a trigger in the same
-- transaction as the status change, so no transition is missed and none is sent twice),
-- delivered from the queue below with retries (at least once), every attempt kept.
create table webhook_endpoints (
    id          text primary key,
    tenant_id   text not null references tenants (id),
    url         text not null,
    -- `whsec_` + base64 of the signing key (Standard Webhooks); needed to sign, so kept.
    secret      text not null,
    events      text[] not null,
    created_at  timestamptz not null default now()
);
create index webhook_endpoints_by_tenant on webhook_endpoints (tenant_id, created_at desc, id desc);

create table webhook_deliveries (
    -- The message id (`webhook-id`): the same on every retry, so receivers can deduplicate.
    id               text primary key,
    endpoint_id      text not null references webhook_endpoints (id) on delete cascade,
    tenant_id        text not null,
    job_id           text not null,
    event_type       text not null,
    payload          jsonb not null,
    status           text not null default 'pending'
                     check (status in ('pending', 'delivering', 'succeeded', 'failed')),
    attempts         int not null default 0,
    next_attempt_at  timestamptz not null default now(),
    lease_expires_at timestamptz,
    created_at       timestamptz not null default now(),
    delivered_at     timestamptz,
    unique (endpoint_id, job_id, event_type)
);
create index webhook_deliveries_due on webhook_deliveries (next_attempt_at)
    where status in ('pending', 'delivering');
create index webhook_deliveries_by_endpoint on webhook_deliveries (endpoint_id, created_at desc, id desc);

create table webhook_attempts (
    delivery_id  text not null references webhook_deliveries (id) on delete cascade,
    attempt      int not null,
    at           timestamptz not null default now(),
    status_code  int,
    error        text,
    duration_ms  int not null,
    primary key (delivery_id, attempt)
);

create function enqueue_job_webhooks() returns trigger language plpgsql as $$
declare
    kind text := 'fine_tuning.job.' || new.status;
    created bigint := extract(epoch from now())::bigint;
begin
    insert into webhook_deliveries (id, endpoint_id, tenant_id, job_id, event_type, payload)
    select 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.id, new.tenant_id, new.id, kind,
           jsonb_build_object(
               'id', 'evt_' || replace(gen_random_uuid()::text, '-', ''),
               'object', 'event',
               'created_at', created,
               'type', kind,
               'data', jsonb_build_object('id', new.id))
      from webhook_endpoints e
     where e.tenant_id = new.tenant_id and kind = any (e.events)
    on conflict (endpoint_id, job_id, event_type) do nothing;
    return new;
end $$;

create trigger jobs_terminal_webhooks after update of status on jobs
    for each row
    when (new.kind = 'fine_tune' and old.status is distinct from new.status
          and new.status in ('succeeded', 'failed', 'cancelled'))
    execute function enqueue_job_webhooks();
