"""sparsegrad-service from Python.

`Client` is the official OpenAI SDK (`client.openai`: files, fine_tuning.jobs, models) plus
what OpenAI's SDK has no call for: a job's artifacts and their resumable, checksummed
download, merge, predict, and `wait` with a progress bar from the event stream.
`apply_delta` writes base + a downloaded delta as a Hugging Face model folder with numpy alone.
"""

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI

from .delta import DeltaError, apply_delta, read_delta

__all__ = ["Client", "ServiceError", "apply_delta", "read_delta", "DeltaError"]

FINAL = ("succeeded", "failed", "cancelled")


class ServiceError(RuntimeError):
    """An error answer in the service's envelope: `status`, `code`, `param`, `message`."""

    def __init__(self, status, body):
        e = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = e.get("code")
        self.param = e.get("param")
        self.message = e.get("message") or f"HTTP {status}"
        super().__init__(f"{status} {self.code}: {self.message}")


class Client:
    def __init__(self, base_url, api_key, timeout=60.0, **openai_kwargs):
        """`base_url` is the service's root (`http://host:8080`) or its `/v1`."""
        root = base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[:-3]
        self.root = root
        self.api_key = api_key
        self.timeout = timeout
        self.openai = OpenAI(base_url=f"{root}/v1", api_key=api_key, timeout=timeout, **openai_kwargs)

    # Plain HTTP for the service's own routes (JSON in, JSON out; errors raised typed).
    def _request(self, method, path, body=None, headers=None, stream=False):
        h = {"Authorization": f"Bearer {self.api_key}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        req = urllib.request.Request(f"{self.root}{path}", data=data, headers=h, method=method)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            raise ServiceError(e.code, parsed) from None
        if stream:
            return resp
        with resp:
            return json.loads(resp.read() or b"null")

    def artifacts(self, job_id):
        """The job's artifacts (its delta, and its merge's model files): dicts with `id`,
        `name`, `kind`, `bytes`, `sha256`, `content_url`."""
        return self._request("GET", f"/v1/fine_tuning/jobs/{job_id}/artifacts")["data"]

    def download(self, artifact, dest, chunk=1 << 20):
        """Downloads an artifact (a dict from `artifacts`) to `dest`, resuming a partial
        `dest + ".part"` with a Range request, and checks its sha256 before the file takes
        its name. Returns `dest`."""
        part = dest + ".part"
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have > artifact["bytes"]:
            os.remove(part)
            have = 0
        if have < artifact["bytes"]:
            headers = {"Range": f"bytes={have}-"} if have else {}
            resp = self._request("GET", artifact["content_url"], headers=headers, stream=True)
            with resp:
                # A server that ignores the range sends the whole object: start over.
                mode = "ab" if have and resp.status == 206 else "wb"
                with open(part, mode) as f:
                    for block in iter(lambda: resp.read(chunk), b""):
                        f.write(block)
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        if h.hexdigest() != artifact["sha256"]:
            os.remove(part)
            raise ServiceError(0, {"error": {"code": "checksum_mismatch", "message":
                               f"{artifact['name']}: sha256 {h.hexdigest()}, expected {artifact['sha256']}"}})
        os.replace(part, dest)
        return dest

    def download_delta(self, job_id, folder):
        """The job's `delta.safetensors` and `delta.json` into `folder`; returns the path of
        `delta.safetensors`."""
        os.makedirs(folder, exist_ok=True)
        out = None
        for a in self.artifacts(job_id):
            if a["kind"] == "delta":
                path = self.download(a, os.path.join(folder, a["name"]))
                if a["name"] == "delta.safetensors":
                    out = path
        if out is None:
            raise ServiceError(404, {"error": {"code": "no_delta", "message": f"{job_id} has no delta (has it succeeded?)"}})
        return out

    def merge(self, job_id, wait=True, poll=1.0, timeout=3600):
        """Asks the service to merge the delta into the base model; with `wait`, returns once
        the merge is final (the merged files are then among `artifacts`)."""
        m = self._request("POST", f"/v1/fine_tuning/jobs/{job_id}/merge")
        deadline = time.time() + timeout
        while wait and m["status"] not in FINAL:
            if time.time() > deadline:
                raise TimeoutError(f"merge of {job_id} still {m['status']}")
            time.sleep(poll)
            m = self._request("GET", f"/v1/fine_tuning/jobs/{job_id}")["merge"]
        return m

    def predict(self, job_id, inputs, max_new_tokens=None):
        """Base + delta on 1-16 inputs (`{"text": …}`, `{"text_a", "text_b"}`, `{"prompt"}`
        or `{"messages"}`); one prediction per input."""
        body = {"inputs": inputs}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        return self._request("POST", f"/v1/fine_tuning/jobs/{job_id}/predict", body)["data"]

    def events(self, job_id, after=None):
        """The job's events as they happen (Server-Sent Events), oldest first, ending when the
        job is final; dicts as `jobs.list_events` has them."""
        headers = {"Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = after
        resp = self._request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", headers=headers, stream=True)
        data = []
        with resp:
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    def wait(self, job_id, progress=False, file=None, timeout=None):
        """Follows the job's events until it is final and returns the job (the SDK's
        `FineTuningJob`). With `progress`, draws a bar from its metrics events."""
        file = file or sys.stderr
        deadline = None if timeout is None else time.time() + timeout
        last = None
        while True:
            try:
                for e in self.events(job_id, after=last):
                    last = e["id"]
                    d = e.get("data") or {}
                    if progress and e.get("type") == "metrics" and d.get("total_steps"):
                        step, total = d["step"], d["total_steps"]
                        filled = int(30 * step / max(total, 1))
                        loss = d.get("train_loss", d.get("loss"))
                        file.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{total} loss {loss:.4f}")
                        file.flush()
                    elif progress and e.get("category") == "status":
                        file.write(f"\n{job_id}: {e['message']}\n")
                    if deadline and time.time() > deadline:
                        raise TimeoutError(f"{job_id} is not final after {timeout}s")
            except (OSError, urllib.error.URLError):
                # A dropped stream resumes after the last event seen.
                time.sleep(1)
            job = self.openai.fine_tuning.jobs.retrieve(job_id)
            if job.status in FINAL:
                if progress:
                    file.write(f"\n{job_id}: {job.status}\n")
                return job
            if deadline and time.time() > deadline:
                raise TimeoutError(f"{job_id} still {job.status} after {timeout}s")
