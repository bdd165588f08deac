"""The official OpenAI Python SDK, as a user has it, in strict mode against a real server and
worker (scripts/sdk-test.sh starts them): every call parses into the SDK's own models, so an
answer whose shape OpenAI's models refuse fails here with APIResponseValidationError.

Environment: BASE_URL, ADMIN_KEY, FIXTURES (the root `sparsegrad fixtures` prints).
"""

import json
import os
import sys
import time
import urllib.request

import openai
from openai import OpenAI

BASE = os.environ["BASE_URL"]
ADMIN = os.environ["ADMIN_KEY"]
FIX = os.environ["FIXTURES"]
MODEL = "all-minilm-l6-v2"


def admin(path, body):
    req = urllib.request.Request(
        f"{BASE}/v1/admin/{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def tenant_client(name):
    t = admin("tenants", {"name": name})
    k = admin("api_keys", {"tenant_id": t["id"]})
    return OpenAI(
        base_url=f"{BASE}/v1",
        api_key=k["key"],
        _strict_response_validation=True,
        max_retries=0,
        timeout=60,
    )


def rows(name, n):
    with open(os.path.join(FIX, "data", "rt_polarity", name), "rb") as f:
        return b"".join(f.readlines()[:n])


def chat_rows(n):
    with open(os.path.join(FIX, "data", "chitchat", "train.jsonl"), "rb") as f:
        return b"".join(f.readlines()[:n])


def expect(err_class, fn, param=None, code=None):
    try:
        fn()
    except err_class as e:
        assert e.message, f"{err_class.__name__} without a message"
        if param is not None:
            assert e.param == param, f"param {e.param!r}, wanted {param!r} ({e.message})"
        if code is not None:
            assert e.code == code, f"code {e.code!r}, wanted {code!r} ({e.message})"
        return e
    raise AssertionError(f"no {err_class.__name__}")


def wait_final(client, job_id, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status} after {limit}s")


def main():
    client = tenant_client("sdk")
    rival = tenant_client("sdk-rival")

    # Files: upload, wait for processing, retrieve, list with auto-pagination, order, purpose.
    train = client.files.create(file=("train.jsonl", rows("train.jsonl", 48)), purpose="fine-tune")
    assert train.status == "processed" and train.purpose == "fine-tune" and train.bytes > 0
    assert client.files.wait_for_processing(train.id, poll_interval=0.1).status == "processed"
    dev = client.files.create(file=("dev.jsonl", rows("dev.jsonl", 32)), purpose="fine-tune")
    extra = client.files.create(file=("extra.jsonl", rows("dev.jsonl", 8)), purpose="fine-tune")
    assert client.files.retrieve(dev.id).filename == "dev.jsonl"
    ids = [f.id for f in client.files.list(limit=1)]
    assert ids == [extra.id, dev.id, train.id], ids
    assert [f.id for f in client.files.list(limit=2, order="asc")] == ids[::-1]
    assert [f.id for f in client.files.list(purpose="batch")] == []
    assert len(client.files.list(limit=10_000).data) == 3
    expect(openai.BadRequestError, lambda: client.files.list(limit=10_001), param="limit")
    expect(openai.NotFoundError, lambda: client.files.list(after="file_nope"), param="after")
    assert client.files.delete(extra.id).deleted
    expect(openai.NotFoundError, lambda: client.files.retrieve(extra.id))
    expect(openai.NotFoundError, lambda: rival.files.retrieve(train.id))

    # Models.
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models and models[MODEL].created > 0, models
    assert client.models.retrieve(MODEL).id == MODEL
    expect(openai.NotFoundError, lambda: client.models.retrieve("no-such-model"))

    # A job in OpenAI's shape (method.supervised), one in the legacy top-level shape, one in
    # the service's own shape.
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        validation_file=dev.id,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 16, "learning_rate_multiplier": 2}
            },
        },
        seed=7,
        suffix="sdk",
        metadata={"suite": "sdk", "shape": "openai"},
    )
    assert job.status == "queued" and job.organization_id, job
    assert job.method.type == "supervised"
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 16
    assert job.hyperparameters.learning_rate_multiplier == 2
    assert job.method.supervised.hyperparameters.model_dump() == job.hyperparameters.model_dump()
    assert job.seed == 7 and job.metadata == {"suite": "sdk", "shape": "openai"}
    # The service's extras survive in the SDK's model.
    assert job.training_method["type"] == "sparsegrad"
    assert job.training_method["hyperparameters"]["lr"] == 2e-3

    legacy = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        metadata={"suite": "sdk", "shape": "legacy"},
    )
    assert legacy.hyperparameters.learning_rate_multiplier == 1
    assert isinstance(legacy.hyperparameters.n_epochs, int)
    own = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        method={"type": "lora", "hyperparameters": {"r": 4, "max_steps": 2, "checkpoint_every": 1}},
        metadata={"suite": "sdk", "shape": "own"},
    )
    assert own.training_method["type"] == "lora" and own.method.type == "supervised"

    # Pause and resume: OpenAI's status stays among its values (a paused job shows `queued`),
    # the service's own says `paused`.
    held = client.fine_tuning.jobs.create(
        model=MODEL, training_file=train.id, metadata={"suite": "sdk", "shape": "paused"}
    )
    paused = client.fine_tuning.jobs.pause(held.id)
    assert paused.status in ("queued", "running"), paused.status
    deadline = time.time() + 120
    while client.fine_tuning.jobs.retrieve(held.id).service_status != "paused":
        assert time.time() < deadline, "the pause never took"
        time.sleep(0.2)
    resumed = client.fine_tuning.jobs.resume(held.id)
    assert resumed.status in ("queued", "running") and resumed.service_status != "paused"
    client.fine_tuning.jobs.cancel(held.id)
    assert wait_final(client, held.id).status == "cancelled"
    e = expect(openai.ConflictError, lambda: client.fine_tuning.jobs.resume(held.id))
    assert e.code == "invalid_job_status", e.code

    # The legacy job is cancelled while queued (one worker trains the first job).
    cancelled = client.fine_tuning.jobs.cancel(legacy.id)
    assert cancelled.status in ("cancelled", "running"), cancelled.status

    # Lists with auto-pagination and metadata filters.
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert listed == [held.id, own.id, legacy.id, job.id], listed
    shaped = [j.id for j in client.fine_tuning.jobs.list(metadata={"shape": "own"})]
    assert shaped == [own.id], shaped
    assert [j.id for j in rival.fine_tuning.jobs.list()] == []
    expect(openai.NotFoundError, lambda: client.fine_tuning.jobs.list(after="ftjob_nope"), param="after")

    # The dry run under its own route (jobs.create always answers a job).
    est = client.post(
        "/fine_tuning/jobs/estimate",
        body={"model": MODEL, "training_file": train.id},
        cast_to=object,
    )
    assert est["object"] == "fine_tuning.job.estimate" and est["estimate"]["duration_secs"] > 0

    # Train to the end; events (message and metrics) and checkpoints parse strictly.
    for j in (job, own):
        done = wait_final(client, j.id)
        assert done.status == "succeeded", (done.status, done.error)
        assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"ft:{MODEL}:")
        assert done.finished_at and done.trained_tokens and done.result_files
        events = list(client.fine_tuning.jobs.list_events(j.id, limit=3))
        kinds = {e.type for e in events}
        assert kinds == {"message", "metrics"}, kinds
        metrics = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
        assert metrics and all(m["step"] >= 1 for m in metrics), metrics
    assert "ft:all-minilm-l6-v2:sdk:" in client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    evals = [
        e.data
        for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
        if e.type == "metrics" and "valid_loss" in (e.data or {})
    ]
    assert evals and "valid_accuracy" in evals[0], evals
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(own.id))
    assert checkpoints, "the LoRA job stores a checkpoint every step"
    for c in checkpoints:
        assert c.fine_tuning_job_id == own.id and c.step_number >= 1
        assert c.metrics.step == c.step_number and c.metrics.train_loss is not None
    final = client.fine_tuning.jobs.retrieve(legacy.id)
    assert final.status == "cancelled", final.status

    # Errors: every class with its param and code.
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, hyperparameters={"n_epochs": 0}
        ),
        param="hyperparameters.n_epochs",
    )
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}},
        ),
        param="method.supervised.hyperparameters.learning_rate_multiplier",
    )
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, method={"type": "dpo", "dpo": {}}
        ),
        param="method.type",
    )
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train.id,
            integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
        ),
        param="integrations",
    )
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(model="no-such-model", training_file=train.id),
        param="model",
        code="model_not_found",
    )
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(model=MODEL, training_file="file_nope"),
        param="training_file",
    )
    key = {"Idempotency-Key": "sdk-once"}
    client.fine_tuning.jobs.create(model=MODEL, training_file=train.id, extra_headers=key, seed=1)
    expect(
        openai.ConflictError,
        lambda: client.fine_tuning.jobs.create(
            model=MODEL, training_file=train.id, extra_headers=key, seed=2
        ),
        code="idempotency_key_reused",
    )
    expect(openai.NotFoundError, lambda: client.fine_tuning.jobs.retrieve("ftjob_nope"))
    expect(openai.NotFoundError, lambda: rival.fine_tuning.jobs.retrieve(job.id))
    expect(openai.NotFoundError, lambda: rival.fine_tuning.jobs.cancel(job.id))
    bad = OpenAI(base_url=f"{BASE}/v1", api_key="sk-wrong", _strict_response_validation=True, max_retries=0)
    expect(openai.AuthenticationError, lambda: bad.files.list())
    # Strict validation is on: an answer that is not the model asked for is refused.
    try:
        client.get("/methods/sparsegrad", cast_to=openai.types.FileObject)
    except openai.APIResponseValidationError:
        pass
    else:
        raise AssertionError("strict validation did not refuse a wrong shape")
    # A route the service lacks answers in the envelope too.
    e = expect(openai.NotFoundError, lambda: client.batches.list())
    assert e.code == "unknown_route", e.code
    chat_completions(client, rival)
    print("openai SDK (strict): every call parsed")


def chat_completions(client, rival):
    """A SmolLM2 fine-tune served by name, as the SDK's users call it."""
    smol = "smollm2-135m-instruct-4l"
    chat = client.files.create(file=("chat.jsonl", chat_rows(32)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=smol,
        training_file=chat.id,
        suffix="chat",
        # The service's own method shape (OpenAI's would run a whole epoch).
        method={
            "type": "sparsegrad",
            "hyperparameters": {"max_steps": 3, "batch_size": 4, "max_seq_len": 32, "basis_steps": 2},
        },
    )
    job = wait_final(client, job.id, limit=900)
    assert job.status == "succeeded", (job.status, job.error)
    model = job.fine_tuned_model
    assert model.startswith(f"ft:{smol}:chat:"), model
    messages = [
        {"role": "system", "content": "You are a friendly assistant."},
        {"role": "user", "content": "Hi! How are you today?"},
    ]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.model == model
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content, whole
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    u = whole.usage
    assert u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    # Streamed: chunks the SDK parses, concatenating to the same answer, usage at the end.
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
    assert finish == choice.finish_reason and usage == u, (finish, usage, u)
    # Seeded sampling repeats itself.
    a, b = (
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.8, seed=7)
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    # Text completions, whole and streamed.
    text = client.completions.create(model=model, prompt="The best way to relax is", max_tokens=8, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text, text
    # Streamed text completions carry `finish_reason: null` until the last chunk, as OpenAI's
    # own do; the SDK's `Completion` model declares the field non-nullable, so strict
    # validation would refuse OpenAI's stream too: this one call is checked unstrictly.
    lenient = OpenAI(base_url=f"{BASE}/v1", api_key=client.api_key, max_retries=0, timeout=60)
    streamed = "".join(
        c.choices[0].text
        for c in lenient.completions.create(
            model=model, prompt="The best way to relax is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text.choices[0].text, (streamed, text.choices[0].text)
    # The base model serves too; another tenant cannot serve this fine-tune.
    base = client.chat.completions.create(model=smol, messages=messages, max_tokens=4, temperature=0)
    assert base.choices[0].message.content is not None
    expect(
        openai.NotFoundError,
        lambda: rival.chat.completions.create(model=model, messages=messages, max_tokens=4),
        param="model",
        code="model_not_found",
    )
    expect(
        openai.BadRequestError,
        lambda: client.chat.completions.create(model=model, messages=messages, temperature=5),
        param="temperature",
    )
    print(f"chat completions: {model} answered {choice.message.content!r}")


if __name__ == "__main__":
    try:
        main()
    except openai.APIResponseValidationError as e:
        print(f"APIResponseValidationError: {e}\n{e.body}", file=sys.stderr)
        raise
