"""`bitalloc serve` end to end: a real uvicorn server in a subprocess on a loopback port, over HTTP.

One server (and its store) is shared by the tests in file order; the restart test kills it with
SIGKILL in the middle of a profiling job and starts it again on the same store, so it runs last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import CALIB_TEXT, make_llama, make_text, make_tokenizer  # noqa: E402

TOKEN = "test-token-" + "x" * 20
REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, CALIB_TOKENS = 32, 256  # the tiny profile: 8 windows, about a second
SLOW_TOKENS = 6144  # 192 windows: several seconds of profiling, so a kill lands mid-job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m bitalloc.cli serve` on a loopback port, with its own store and allowed root."""

    def __init__(self, store: Path, root: Path, log: Path, extra: tuple[str, ...] = ()):
        self.store, self.root, self.log, self.extra = store, root, log, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "BITALLOC_TOKEN": TOKEN, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "bitalloc.cli", "serve", "--port", str(self.port), "--store", str(self.store),
               "--allow-root", str(self.root), "--workers", "1", "--max-body", "4096", *self.extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-2000:]}"
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not answer /healthz in 120 s")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("allowed").resolve()
    model = root / "tiny-llama"
    make_tokenizer().save_pretrained(model)
    make_llama().save_pretrained(model)
    (root / "calib.txt").write_text(CALIB_TEXT, encoding="utf-8")
    (root / "calib-large.txt").write_text(make_text(seed=3, sentences=3000), encoding="utf-8")
    outside = tmp_path_factory.mktemp("outside").resolve()
    (outside / "calib.txt").write_text(CALIB_TEXT, encoding="utf-8")
    return {"root": root, "model": model, "calib": root / "calib.txt", "calib_large": root / "calib-large.txt",
            "outside": outside, "store": tmp_path_factory.mktemp("store") / "store",
            "log": tmp_path_factory.mktemp("log") / "server.log"}


@pytest.fixture(scope="module")
def server(files):
    s = Server(files["store"], files["root"], files["log"])
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    # base_url follows the server object, so a restarted server (same port) is reached the same way
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def profile_body(files, tokens=CALIB_TOKENS, calib="calib", seed=0) -> dict:
    return {"model": str(files["model"]), "calibration": {"path": str(files[calib]), "seq_len": SEQ_LEN,
                                                         "tokens": tokens, "seed": seed}}


def wait_job(client, job_id: str, timeout: float = 90, until=("done", "failed")) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in until:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    for w in words:
        assert w in body["detail"], body
    return body


@pytest.fixture(scope="module")
def profile_id(client, files) -> str:
    first = client.post("/v1/profiles", json=profile_body(files))
    assert first.status_code == 202, first.text
    job = wait_job(client, first.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["attempts"] == 1
    return first.json()["profile_id"]


# ---- auth ----------------------------------------------------------------------------------------


def test_every_route_but_healthz_needs_the_token(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    for method, path in [("GET", "/v1/plans"), ("GET", "/v1/jobs/job_x"), ("GET", "/v1/plans/plan_x"),
                         ("POST", "/v1/plans"), ("POST", "/v1/profiles"), ("GET", "/openapi.json"),
                         ("DELETE", "/v1/jobs/job_x")]:
        assert_error(httpx.request(method, server.url + path), 401, "Bearer")
        assert_error(httpx.request(method, server.url + path, headers={"Authorization": "Bearer wrong"}), 401)
    doc = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert {"/v1/profiles", "/v1/plans", "/v1/jobs/{job_id}", "/v1/plans/{plan_id}", "/v1/plans/{plan_id}/export",
            "/healthz"} <= set(doc["paths"])


# ---- profiles and plans ----------------------------------------------------------------------------


def test_profile_job_then_same_request_returns_the_stored_profile(client, files, profile_id):
    again = client.post("/v1/profiles", json=profile_body(files))
    assert again.status_code == 200
    body = again.json()
    assert body["profile_id"] == profile_id and body["state"] == "done"
    assert body["profile"]["modules"] == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert body["profile"]["calibration"]["tokens"] == CALIB_TOKENS
    info = client.get(f"/v1/profiles/{profile_id}").json()
    assert info["model_source"] == str(files["model"]) and info["model_hash"].startswith("sha256:")


def test_plan_at_once_from_a_cached_profile_equals_the_library_plan(client, files, profile_id):
    import bitalloc

    t0 = time.perf_counter()
    r = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "4bits"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "done" and body["job"] is None
    served = body["plan"]["plan"]
    local = bitalloc.plan(str(files["model"]), "4bits", str(files["calib"]), seq_len=SEQ_LEN, calib_tokens=CALIB_TOKENS,
                          cache_dir=False)
    # Planned from the stored table + model record, without the weights: the same plan, byte for byte.
    assert json.dumps(served, sort_keys=True) == json.dumps(json.loads(local.to_json()), sort_keys=True)
    assert served["summary"]["storage_bits_per_weight"] <= 4.0
    # the same request again is the same plan (content id), and GET returns it
    again = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "4bits"}).json()
    assert again["plan_id"] == body["plan_id"]
    assert client.get(f"/v1/plans/{body['plan_id']}").json()["plan"] == served
    assert time.perf_counter() - t0 < 60


def test_plan_for_a_model_without_profile_is_a_job(client, files):
    r = client.post("/v1/plans", json={**profile_body(files, seed=1), "budget": "30%", "formats": ["int", "keep"]})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["plan_id"] == r.json()["plan_id"] and job["kind"] == "plan"
    plan = client.get(f"/v1/plans/{job['plan_id']}").json()["plan"]
    assert plan["budget"]["text"] == "30%" and plan["calibration"]["seed"] == 1
    assert plan["summary"]["storage_bytes"] <= 0.30 * plan["summary"]["fp16_bytes"]


def test_plan_without_calibration_uses_the_builtin_set_and_deployable_ties(client, files):
    r = client.post("/v1/plans", json={"model": str(files["model"]), "budget": "3.2bits"})  # the headline request
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"], timeout=300)
    assert job["state"] == "done", str(job)
    plan = client.get(f"/v1/plans/{job['plan_id']}").json()["plan"]
    assert plan["calibration"]["source"] == "builtin:austen" and plan["calibration"]["tokens"] == 8192
    s = plan["summary"]
    assert s["ties"] == {"gate_up": 2, "qkv": 2} and plan["constraints"]["ties"] == ["fused"]
    assert s["model_bytes"] == s["storage_bytes"] + s["unplanned_bytes"] and s["unplanned_bytes"] == 2 * s["unplanned_weights"] > 0


def test_formats_narrow_a_stored_profile(client, profile_id):
    r = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "9bits", "formats": ["int"]})
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]["plan"]
    assert plan["options"] and all(label.startswith("int") for label in plan["options"])
    assert {a["option"]["fmt"] for a in plan["assignments"]} == {"int"}


def test_a_whole_model_budget_counts_the_unplanned_tensors(client, profile_id):
    planned = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "6bits"}).json()["plan"]["plan"]
    r = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "6bits", "budget_scope": "model"})
    assert r.status_code == 200, r.text
    whole = r.json()["plan"]["plan"]
    assert whole["budget"]["scope"] == "model"
    s = whole["summary"]
    # 6 bits per weight over every weight of the model, the 16-bit embedding and norms included
    assert s["model_bytes"] * 8 <= 6 * (s["planned_weights"] + s["unplanned_weights"])
    assert s["storage_bytes"] < planned["summary"]["storage_bytes"]  # the unplanned tensors take their share
    assert_error(client.post("/v1/plans", json={"profile_id": profile_id, "budget": "6bits", "budget_scope": "all"}),
                 400, "budget_scope")


def test_history_lists_plans_by_model(client, files, profile_id):
    # Make the plan it lists: under pytest-xdist the test that made one may have run in another worker.
    plan_id = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "4bits"}).json()["plan_id"]
    by_path = client.get("/v1/plans", params={"model": str(files["model"])}).json()["plans"]
    assert plan_id in [p["id"] for p in by_path]
    model_hash = by_path[0]["model_hash"]
    by_hash = client.get("/v1/plans", params={"model": model_hash}).json()["plans"]
    assert [p["id"] for p in by_hash] == [p["id"] for p in by_path]
    assert "4bits" in {p["budget"] for p in by_path}
    assert client.get("/v1/plans", params={"model": "/nowhere/else"}).json() == {"plans": []}


def test_50_concurrent_plan_requests_lose_and_duplicate_nothing(client, server, profile_id):
    budgets = [f"{3 + 0.1 * i:.1f}bits" for i in range(25)]  # 25 distinct plans, each asked for twice
    before = {p["id"] for p in client.get("/v1/plans", params={"limit": 10000}).json()["plans"]}

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=120, limits=httpx.Limits(max_connections=50)) as ac:
            reqs = [ac.post("/v1/plans", json={"profile_id": profile_id, "budget": b}) for b in budgets + budgets]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(fire())
    assert len(responses) == 50 and all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    ids = [r.json()["plan_id"] for r in responses]
    # the policy: same profile + settings -> the same plan id (one history entry), different budget -> a new one
    assert ids[:25] == ids[25:] and len(set(ids)) == 25
    for r, b in zip(responses, budgets + budgets):
        assert r.json()["plan"]["budget"] == b
        assert r.json()["plan"]["plan"]["summary"]["storage_bits_per_weight"] <= float(b[:-4]) + 1e-9
    history = [p["id"] for p in client.get("/v1/plans", params={"limit": 10000}).json()["plans"]]
    assert len(history) == len(set(history))  # no duplicates
    new = [i for i in history if i not in before]
    assert sorted(new) == sorted(set(ids) - before)  # none lost, nothing else added


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_get_4xx_json(client, files, profile_id):
    plan = {"profile_id": profile_id, "budget": "4bits"}
    assert_error(client.post("/v1/plans", json={**plan, "budget": "four bits"}), 400, "cannot read budget")
    assert_error(client.post("/v1/plans", json={**plan, "budget": "0.5bits"}), 422, "below the smallest feasible")
    assert_error(client.post("/v1/plans", json={**plan, "solver": "magic"}), 400, "unknown solver 'magic'", "ilp")
    assert_error(client.post("/v1/plans", json={**plan, "solver_settings": {"nonsense": 1}}), 400, "no setting nonsense")
    assert_error(client.post("/v1/plans", json={**plan, "trust_remote_code": True}), 400, "trust_remote_code")
    assert_error(client.post("/v1/profiles", json={**profile_body(files), "trust_remote_code": True}), 400,
                 "trust_remote_code")
    assert_error(client.post("/v1/plans", json={"budget": "4bits"}), 400, "exactly one of profile_id")
    assert_error(client.post("/v1/plans", json={**plan, "profile_id": "prof_nope"}), 404, "prof_nope")
    outside = profile_body(files)
    outside["calibration"]["path"] = str(files["outside"] / "calib.txt")
    assert_error(client.post("/v1/profiles", json=outside), 400, "outside the allowed roots")
    sneaky = {**profile_body(files), "model": str(files["root"] / ".." / files["outside"].name)}
    assert_error(client.post("/v1/profiles", json=sneaky), 400, "outside the allowed roots")
    assert_error(client.post("/v1/profiles", json={**profile_body(files), "model": "org/name"}), 400,
                 "does not download from the hub")
    assert_error(client.post("/v1/profiles", json={**profile_body(files), "model": "relative/dir/../x"}), 400,
                 "neither an absolute path nor a hub id")
    assert_error(client.post("/v1/profiles", json={**profile_body(files), "model": "./tiny"}), 400, "not an absolute path")
    assert_error(client.post("/v1/profiles", json={**profile_body(files), "model": str(files["root"])}), 400,
                 "directory with config.json")
    big = {**plan, "constraints": {"ties": ["x" * 5000]}}
    assert_error(client.post("/v1/plans", json=big), 413, "over 4096 bytes")
    chunked = client.post("/v1/plans", content=iter([json.dumps(big).encode()]),
                          headers={"content-type": "application/json"})  # no Content-Length: counted while read
    assert_error(chunked, 413, "over 4096 bytes")
    assert_error(client.post("/v1/plans", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.get("/v1/jobs/job_unknown"), 404, "no job")
    assert_error(client.get("/v1/plans/plan_unknown"), 404, "no plan")
    assert_error(client.get("/v1/plans/plan_unknown/export", params={"to": "gguf"}), 404, "no plan")


def test_export_route_uses_the_export_registry(client, files, profile_id, tmp_path):
    """Unknown targets list what is registered; a real exporter's file is what the route returns."""
    plan_id = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "4bits"}).json()["plan_id"]
    from bitalloc import exports

    available = exports.available_exports()
    body = assert_error(client.get(f"/v1/plans/{plan_id}/export", params={"to": "nosuch"}), 400, "unknown export target")
    assert body["detail"].endswith(", ".join(available) or "none on this server")

    assert {"gguf", "compressed-tensors", "modelopt", "gptqmodel", "autoround", "torchao"} <= set(available)

    # A real exporter through the server: llama.cpp's tensor-type file, one line per planned module.
    r = client.get(f"/v1/plans/{plan_id}/export", params={"to": "gguf"})
    assert r.status_code == 200, r.text
    plan = client.get(f"/v1/plans/{plan_id}").json()["plan"]
    lines = r.text.splitlines()
    assert len(lines) == len(plan["assignments"])
    assert lines[0].startswith("^blk\\.0\\.") and "=" in lines[0]
    notes = json.loads(r.headers["x-bitalloc-export"])["notes"]
    assert any("llama-quantize --tensor-type-file" in n for n in notes)


# ---- limits, cancel, fair queue, allowed roots --------------------------------------------------------


def test_a_blocking_job_is_cancelled_while_other_requests_complete(client, files, profile_id):
    """One worker, busy with a long evolutionary search: a plan from the stored profile still comes at once,
    DELETE cancels the search (failed, with the reason; its worker replaced), and the next queued job runs."""
    base = {"profile_id": profile_id, "budget": "5bits", "solver": "evolutionary"}
    too_much = client.post("/v1/plans", json={**base, "solver_settings": {"trials": 100_000_000}})
    assert_error(too_much, 400, "solver_settings.trials", "up to 5000")
    assert_error(client.post("/v1/plans", json={**base, "solver_settings": {"timeout_s": "forever"}}), 400,
                 "solver_settings.timeout_s")
    blocking = client.post("/v1/plans", json={**base, "seed": 7, "solver_settings": {"trials": 5000, "population": 64}},
                           headers={"X-Bitalloc-Client": "alice"})
    assert blocking.status_code == 202, blocking.text
    job_id = blocking.json()["job"]["id"]
    running = wait_job(client, job_id, until=("running", "done", "failed"))
    assert running["state"] == "running", running

    at_once = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "3.5bits"},
                          headers={"X-Bitalloc-Client": "bob"})
    assert at_once.status_code == 200 and at_once.json()["state"] == "done", at_once.text
    queued = client.post("/v1/plans", json={**base, "seed": 8, "solver_settings": {"trials": 3, "population": 2}},
                         headers={"X-Bitalloc-Client": "bob"})
    assert queued.status_code == 202 and queued.json()["job"]["state"] == "queued", queued.text
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"  # still blocking the only worker

    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "failed" and "cancelled by a client" in cancelled.json()["error"]
    done = wait_job(client, queued.json()["job"]["id"], timeout=120)
    assert done["state"] == "done", done
    assert client.get(f"/v1/plans/{done['plan_id']}").json()["plan"]["solver"]["name"] == "evolutionary"
    final = client.get(f"/v1/jobs/{job_id}").json()
    assert final["state"] == "failed" and final["attempts"] == 1 and final["requeues"] == 0, final  # not retried
    assert client.get(f"/v1/plans/{blocking.json()['plan_id']}").status_code == 404  # and it stored nothing
    assert_error(client.delete(f"/v1/jobs/{job_id}"), 409, "has finished (failed)")
    assert_error(client.delete("/v1/jobs/job_unknown"), 404, "no job")


def test_a_job_past_its_requests_timeout_fails_with_the_reason_while_the_next_completes(client, files, profile_id):
    """timeout_s ends the one job that asked for it (failed, with the reason, not retried, nothing stored); the
    job queued behind it on the only worker then runs; a timeout above the server's --job-timeout is refused."""
    base = {"profile_id": profile_id, "budget": "5bits", "solver": "evolutionary"}
    assert_error(client.post("/v1/plans", json={**base, "timeout_s": 4000}), 400,
                 "timeout_s = 4000:", "at most 3600 s", "--job-timeout")
    assert_error(client.post("/v1/profiles", json={**profile_body(files), "timeout_s": 4000}), 400, "at most 3600 s")
    assert_error(client.post("/v1/plans", json={**base, "timeout_s": 0}), 400, "timeout_s")
    blocking = client.post("/v1/plans", json={**base, "seed": 9, "timeout_s": 1,
                                              "solver_settings": {"trials": 5000, "population": 64}})
    assert blocking.status_code == 202 and blocking.json()["job"]["timeout_s"] == 1, blocking.text
    queued = client.post("/v1/plans", json={**base, "seed": 10, "solver_settings": {"trials": 3, "population": 2}})
    assert queued.status_code == 202 and queued.json()["job"]["timeout_s"] is None, queued.text
    job_id = blocking.json()["job"]["id"]
    started = time.time()
    failed = wait_job(client, job_id, timeout=60)
    assert failed["state"] == "failed", failed  # 5000 trials of 64 take far longer than the 1 s it asked for
    assert failed["error"].startswith("timed out: ran over its request's timeout_s of 1 s"), failed
    assert time.time() - started < 30  # ended by its limit (checked every 2 s), not by running out of trials
    done = wait_job(client, queued.json()["job"]["id"], timeout=120)
    assert done["state"] == "done", done
    final = client.get(f"/v1/jobs/{job_id}").json()
    assert final["state"] == "failed" and final["attempts"] == 1 and final["requeues"] == 0, final  # not retried
    assert client.get(f"/v1/plans/{blocking.json()['plan_id']}").status_code == 404  # and it stored nothing


def test_a_model_file_linked_outside_the_allowed_root_is_refused(client, files):
    """--allow-root checks every file in the model folder, resolved, not only the folder's own path."""
    linked = files["root"] / "linked-llama"
    linked.mkdir(exist_ok=True)
    for f in files["model"].iterdir():
        target = f
        if f.name == "model.safetensors":  # the weights lie outside the root
            target = files["outside"] / f.name
            target.write_bytes(f.read_bytes())
        if not (linked / f.name).exists():
            (linked / f.name).symlink_to(target)
    r = client.post("/v1/profiles", json={**profile_body(files), "model": str(linked)})
    assert_error(r, 400, "model.safetensors resolves to", str(files["outside"]), "outside the allowed roots")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(files["model"] / "model.safetensors")  # a link inside the root is fine
    r = client.post("/v1/profiles", json={**profile_body(files, seed=5), "model": str(linked)})
    assert r.status_code == 202, r.text
    assert client.delete(f"/v1/jobs/{r.json()['job']['id']}").json()["state"] == "failed"  # not needed: free the worker


# ---- restart -----------------------------------------------------------------------------------------


def test_restart_in_the_middle_of_a_job_requeues_it_and_it_completes_once(client, server, files):
    r = client.post("/v1/profiles", json=profile_body(files, tokens=SLOW_TOKENS, calib="calib_large"))
    assert r.status_code == 202, r.text
    job_id, profile_id = r.json()["job"]["id"], r.json()["profile_id"]
    running = wait_job(client, job_id, until=("running", "done", "failed"))
    deadline = time.time() + 60
    while not (running["stage"] or "").startswith("profiling") and time.time() < deadline:
        running = client.get(f"/v1/jobs/{job_id}").json()
        time.sleep(0.05)
    assert running["state"] == "running" and running["stage"].startswith("profiling"), running
    # progress counts the profiler's steps: e.g. "profiling: calibration windows 37/192"
    deadline = time.time() + 60
    while "/" not in running["stage"] and time.time() < deadline:
        running = client.get(f"/v1/jobs/{job_id}").json()
        time.sleep(0.05)
    assert running["state"] == "running" and 0.2 <= running["progress"] < 1.0, running
    assert running["stage"].split()[-1].split("/")[1] in ("192", "14"), running

    server.kill9()  # the worker dies with it (PR_SET_PDEATHSIG)
    db = sqlite3.connect(files["store"] / "bitalloc.db")
    # in file order: the cancelled jobs and the one past its request's timeout_s
    failed = db.execute("SELECT id, attempts, error FROM jobs WHERE state='failed' ORDER BY id").fetchall()
    state, attempts = db.execute("SELECT state, attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
    assert (state, attempts) == ("running", 1)  # as the dead process left it
    assert db.execute("SELECT COUNT(*) FROM profiles WHERE id=?", (profile_id,)).fetchone() == (0,)

    server.start()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["requeues"] == 1 and "re-queued" in job["note"], job
    job = wait_job(client, job_id, timeout=120)
    assert job["state"] == "done", job
    assert job["attempts"] == 2 and job["requeues"] == 1
    completions, = db.execute("SELECT completions FROM jobs WHERE id=?", (job_id,)).fetchone()
    assert completions == 1
    assert db.execute("SELECT COUNT(*) FROM profiles WHERE id=?", (profile_id,)).fetchone() == (1,)
    # jobs that failed before the restart (cancelled, timed out) stay failed: none was re-queued or re-run
    assert db.execute("SELECT id, attempts, error FROM jobs WHERE state='failed' ORDER BY id").fetchall() == failed
    assert db.execute("SELECT COUNT(*) FROM jobs WHERE dedupe_key=?", (f"profile:{profile_id}",)).fetchone() == (1,)
    # the stored profile survived too: the same request now returns it at once
    again = client.post("/v1/profiles", json=profile_body(files, tokens=SLOW_TOKENS, calib="calib_large"))
    assert again.status_code == 200 and again.json()["profile"]["calibration"]["tokens"] == SLOW_TOKENS
    # and plans made before the restart are still there
    assert client.get("/v1/plans").json()["plans"]


# ---- the store on its own (no server) ---------------------------------------------------------------


def test_store_claims_each_job_once_under_contention(tmp_path):
    from bitalloc.service.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s")
    ids = [store.create_job("profile", {"n": i}, dedupe_key=f"k{i}")[0].id for i in range(40)]
    # a second request for live work joins the existing job
    joined, created = store.create_job("profile", {"n": 0}, dedupe_key="k0")
    assert (joined.id, created) == (ids[0], False)
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(owner: str) -> None:
        s = SQLiteStore(tmp_path / "s")  # its own connection, as a worker process has
        while (job := s.claim_job(owner)) is not None:
            assert s.finish_job(job.id, owner, {"by": owner})
            with lock:
                claimed.append((job.id, owner))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in claimed) == sorted(ids)  # every job once: none lost, none twice
    assert all(store.get_job(j).completions == 1 and store.get_job(j).attempts == 1 for j in ids)


def test_store_requeues_dead_owners_and_gives_up_after_max_attempts(tmp_path):
    from bitalloc.service.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s")
    job, _ = store.create_job("profile", {}, dedupe_key="k")
    for attempt in (1, 2):
        claimed = store.claim_job(f"old{attempt}")
        assert claimed.attempts == attempt
        assert store.requeue_dead(lambda j: j.lease_owner == f"old{attempt}", max_attempts=3) == [job.id]
        again = store.get_job(job.id)
        assert again.state == "queued" and again.requeues == attempt and f"old{attempt}" in again.note
        # the dead owner's late answer is refused: its lease is gone
        assert not store.finish_job(job.id, f"old{attempt}", {}) and not store.heartbeat(job.id, f"old{attempt}")
    store.claim_job("old3")
    assert store.requeue_dead(lambda j: True, max_attempts=3) == [job.id]
    final = store.get_job(job.id)
    assert final.state == "failed" and "died 3 times" in final.error and final.completions == 0


def test_a_solver_that_scores_on_the_model_plans_in_a_job_with_the_weights(tmp_path, model_dir):
    """evolutionary scores candidates on the real model, so its plan job loads the weights (in-process here)."""
    from bitalloc.service.app import _profile_spec
    from bitalloc.service.jobs import run_job
    from bitalloc.service.schemas import CalibrationIn, OptionsIn
    from bitalloc.service.sources import SourceRules
    from bitalloc.service.store import SQLiteStore
    from bitalloc.service.work import PlanSpec

    store = SQLiteStore(tmp_path / "s")
    spec = _profile_spec(str(model_dir), CalibrationIn(path=str(model_dir / "calib.txt"), seq_len=SEQ_LEN, tokens=128),
                         OptionsIn(bits=[3, 4, 8], group_sizes=[32]), False, False, SourceRules())
    plan_spec = PlanSpec(budget="5bits", solver="evolutionary", solver_settings=(("population", 2), ("trials", 3)))
    assert plan_spec.needs_model and not PlanSpec(budget="5bits").needs_model
    job, _ = store.create_job("plan", {"profile": spec.to_dict(), "plan": plan_spec.to_dict()}, "k")
    claimed = store.claim_job("me")
    stages = []
    result = run_job(store, claimed, lambda p, s: stages.append((p, s)))
    assert result["profile_id"] == spec.profile_id and result["plan_id"] == plan_spec.plan_id(spec.profile_id)
    plan = json.loads(store.get_plan(result["plan_id"]).plan_json)
    assert plan["solver"]["name"] == "evolutionary" and plan["summary"]["storage_bits_per_weight"] <= 5.0
    assert [p for p, _ in stages] == sorted(p for p, _ in stages)  # progress only moves forward
    assert store.get_profile(spec.profile_id).meta["num_weights"] == plan["summary"]["planned_weights"]


def test_fair_queue_alternates_clients(tmp_path):
    """Alice queues three jobs, then Bob one: Bob's runs second, not fourth."""
    from bitalloc.service.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s")
    ids = {}
    for name, client in [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob")]:
        ids[store.create_job("plan", {"n": name}, None, client=client)[0].id] = name
        time.sleep(0.002)  # distinct creation times
    order = []
    while (job := store.claim_job("w")) is not None:
        order.append(ids[job.id])
        time.sleep(0.002)
    assert order == ["a1", "b1", "a2", "a3"]


def test_timed_out_and_cancelled_jobs_fail_with_the_reason_and_are_never_requeued(tmp_path):
    from bitalloc.service.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s")
    slow, _ = store.create_job("plan", {"n": 1}, "slow")
    queued, _ = store.create_job("plan", {"n": 2}, "queued")
    claimed = store.claim_job("host:1:0")
    assert claimed.id == slow.id and claimed.claimed is not None
    assert store.expire_jobs(60.0, now=claimed.claimed + 59) == []
    (expired,) = store.expire_jobs(60.0, now=claimed.claimed + 61)
    assert expired.lease_owner == "host:1:0"  # the worker the pool kills
    after = store.get_job(slow.id)
    assert after.state == "failed" and after.error.startswith("timed out: ran over the server's job limit of 60 s")
    assert not store.finish_job(slow.id, "host:1:0", {"plan_id": "x"})  # the old worker cannot record a result
    before = store.cancel_job(queued.id, "cancelled by a client")
    assert before.state == "queued" and store.get_job(queued.id).error == "cancelled by a client"
    assert store.cancel_job(queued.id, "again") is None  # finished jobs stay as they are
    assert store.requeue_dead(lambda job: True, 3) == []  # failed is final: a restart re-queues neither
    assert store.claim_job("host:1:1") is None
    assert {store.get_job(j).state for j in (slow.id, queued.id)} == {"failed"}


def test_a_requests_own_timeout_ends_its_job_and_never_extends_the_servers(tmp_path):
    from bitalloc.service.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s")
    short, _ = store.create_job("plan", {"n": 1}, "short", timeout_s=5.0)
    long_, _ = store.create_job("plan", {"n": 2}, "long", timeout_s=600.0)  # above the server's 60: 60 holds
    plain, _ = store.create_job("plan", {"n": 3}, "plain")
    claimed = {store.claim_job(f"host:1:{i}").id: i for i in range(3)}
    assert store.get_job(short.id).timeout_s == 5.0 and store.get_job(plain.id).timeout_s is None
    t0 = max(store.get_job(j).claimed for j in claimed)
    assert store.expire_jobs(60.0, now=t0 + 4) == []
    (expired,) = store.expire_jobs(60.0, now=t0 + 6)
    assert expired.id == short.id and expired.lease_owner == f"host:1:{claimed[short.id]}"
    assert store.get_job(short.id).error.startswith("timed out: ran over its request's timeout_s of 5 s")
    assert {j.id for j in store.expire_jobs(60.0, now=t0 + 61)} == {long_.id, plain.id}
    assert store.get_job(long_.id).error.startswith("timed out: ran over the server's job limit of 60 s")
    assert store.requeue_dead(lambda job: True, 3) == []  # a restart re-queues none of them
    assert {store.get_job(j).state for j in claimed} == {"failed"}


def test_solver_settings_over_the_server_maxima_are_refused():
    from bitalloc.errors import BadInputError
    from bitalloc.service.limits import ServiceLimits

    limits = ServiceLimits(job_timeout_s=10)
    limits.check_solver_settings("evolutionary", {"trials": 5000, "timeout_s": None, "seed": 3})
    limits.check_solver_settings("ilp", {"time_limit_s": 300})
    for solver, settings, needle in [("evolutionary", {"trials": 5001}, "trials"),
                                     ("evolutionary", {"trials": True}, "trials"),
                                     ("evolutionary", {"timeout_s": -1}, "timeout_s"),
                                     ("ilp", {"time_limit_s": 1e9}, "time_limit_s"),
                                     ("dp", {"max_work": float("inf")}, "max_work")]:
        with pytest.raises(BadInputError, match=f"solver_settings.{needle} .*stop after 10 s"):
            limits.check_solver_settings(solver, settings)
    with pytest.raises(BadInputError, match="--job-timeout"):
        ServiceLimits(job_timeout_s=0)
    assert limits.request_timeout(None) is None and limits.request_timeout(10) == 10.0
    for bad in (10.5, 0, -1, float("nan"), float("inf"), True):
        with pytest.raises(BadInputError, match=r"^timeout_s = .*at most 10 s \(bitalloc serve --job-timeout\)"):
            limits.request_timeout(bad)


def test_a_damaged_stored_profile_is_refused_and_forgotten(tmp_path, model_dir):
    """The service stores a profile folder (profile/artifact.py, as `bitalloc profile --out`): one checksum covers
    the table, the calibration tokens and the metadata. A failure drops the row, so the next request for the same
    profile recomputes it."""
    from bitalloc.errors import BadInputError
    from bitalloc.service.app import _profile_spec
    from bitalloc.service.schemas import CalibrationIn, OptionsIn
    from bitalloc.service.sources import SourceRules
    from bitalloc.service.store import SQLiteStore
    from bitalloc.service.work import PlanSpec, build_profile, plan_from_stored

    store = SQLiteStore(tmp_path / "s")
    spec = _profile_spec(str(model_dir), CalibrationIn(path=str(model_dir / "calib.txt"), seq_len=SEQ_LEN, tokens=96),
                         OptionsIn(bits=[3, 4], group_sizes=[32]), False, False, SourceRules())
    record, _, _ = build_profile(store, spec, None, lambda p, s: None)
    folder = store.profile_dir(record.id)
    assert sorted(p.name for p in folder.iterdir()) == ["profile.json", "tensors.npz"]

    tensors = folder / "tensors.npz"
    tensors.write_bytes(tensors.read_bytes()[:-40] + bytes(40))  # the tail of the packed arrays
    with pytest.raises(BadInputError, match=r"failed its checks .*damaged.*POST /v1/profiles"):
        plan_from_stored(store, record.id, PlanSpec(budget="4bits"))
    assert store.get_profile(record.id) is None  # forgotten: a new request profiles again

    record, _, _ = build_profile(store, spec, None, lambda p, s: None)
    doc = json.loads((folder / "profile.json").read_text())
    doc["profile"]["settings"]["calibration"]["seed"] = 7  # the metadata only: the arrays are untouched
    (folder / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="does not match its checksum"):
        plan_from_stored(store, record.id, PlanSpec(budget="4bits"))
    assert store.get_profile(record.id) is None
