"""Render jobs end to end, every program a real process under supervisord with
a real redis-server: 10 jobs submitted through the gateway, a worker kill -9'd
mid-job, Redis kill -9'd once; every job ends done or failed with a reason,
none is lost, none is done twice (one archive entry and one "job done" log
line each); a job whose avatar was deleted after submission fails 3 times and
sits on the failed list with its error and trace id. Then bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import av
import grpc
import pytest
from PIL import Image
from skimage import data

from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2, talker_pb2, talker_pb2_grpc
from tests.processes import VENV_BIN, Supervisor, assert_logs_are_json
from tests.speech import piper_speech, to_wav

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (make system-deps)"
)

USER = "jobs-test"
SENTENCES = [
    "Welcome to the product tour.",
    "Today we look at the new dashboard.",
    "Every chart updates in real time.",
    "You can share a view with one click.",
    "Reports are ready every morning.",
    "Alerts reach you on your phone.",
    "Your data stays on your servers.",
    "Thank you for watching.",
]
FINAL = {talker_pb2.JOB_STATE_DONE, talker_pb2.JOB_STATE_FAILED, talker_pb2.JOB_STATE_CANCELLED}
WORKERS = ("talker:worker_00", "talker:worker_01")


@pytest.fixture(scope="module")
def jobs_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    supervisor = Supervisor(
        tmp_path_factory.mktemp("var"),
        env={
            "TALKER_JOBS_WORKERS": "2",
            # A dead worker's job is taken over after 5 s without renewal.
            "TALKER_JOBS_CLAIM_IDLE_S": "5",
            "TALKER_JOBS_HEARTBEAT_S": "1",
            "TALKER_WORKER_POLL_S": "0.5",
        },
    )
    supervisor.start()
    try:
        for address in supervisor.addresses.values():
            supervisor.wait_status(address, timeout_s=240)
        for name in (*WORKERS, "redis"):
            supervisor.wait_running(name)
        yield supervisor
    finally:
        supervisor.stop()
    # Kills, restarts and all: every line every program logged is JSON.
    assert_logs_are_json(supervisor.var_dir)


@pytest.fixture(scope="module")
def gateway(jobs_system: Supervisor) -> talker_pb2_grpc.TalkerServiceStub:
    return talker_pb2_grpc.TalkerServiceStub(
        grpc.insecure_channel(jobs_system.addresses["gateway"])
    )


@pytest.fixture(scope="module")
def animate(jobs_system: Supervisor) -> animate_pb2_grpc.AnimateServiceStub:
    return animate_pb2_grpc.AnimateServiceStub(
        grpc.insecure_channel(jobs_system.addresses["animate"])
    )


def create_avatar(animate: animate_pb2_grpc.AnimateServiceStub, name: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    request = animate_pb2.CreateAvatarRequest(image=buffer.getvalue(), display_name=name)
    return str(animate.CreateAvatar(request, timeout=120).avatar.avatar_id)


def submit(
    gateway: talker_pb2_grpc.TalkerServiceStub, trace_id: str, **fields: object
) -> talker_pb2.Job:
    request = talker_pb2.SubmitRenderRequest(user_id=USER, **fields)  # type: ignore[arg-type]
    response = gateway.SubmitRender(request, timeout=30, metadata=(("x-trace-id", trace_id),))
    assert response.job.state == talker_pb2.JOB_STATE_QUEUED
    assert response.job.trace_id == trace_id
    return response.job


def get_job(gateway: talker_pb2_grpc.TalkerServiceStub, job_id: str) -> talker_pb2.Job | None:
    """The job, or None while the queue is unreachable (Redis restarting)."""
    try:
        return gateway.GetJob(talker_pb2.GetJobRequest(job_id=job_id), timeout=10).job
    except grpc.RpcError as error:
        if error.code() is grpc.StatusCode.UNAVAILABLE:
            return None
        raise


def kill_9(system: Supervisor, name: str) -> int:
    pid = int(system.ctl("pid", name).stdout.strip())
    os.kill(pid, signal.SIGKILL)
    return pid


def test_jobs_survive_a_killed_worker_and_a_redis_restart_and_finish_once(
    jobs_system: Supervisor,
    gateway: talker_pb2_grpc.TalkerServiceStub,
    animate: animate_pb2_grpc.AnimateServiceStub,
) -> None:
    started = time.monotonic()
    avatar = create_avatar(animate, "presenter")
    doomed_avatar = create_avatar(animate, "doomed")
    jobs: dict[str, talker_pb2.Job] = {}
    for i, sentence in enumerate(SENTENCES):
        priority = talker_pb2.JOB_PRIORITY_HIGH if i % 3 == 0 else talker_pb2.JOB_PRIORITY_NORMAL
        job = submit(
            gateway,
            f"jobs-test-{i}",
            scene=f"tour-{i}",
            avatar_id=avatar,
            script=sentence,
            priority=priority,
        )
        jobs[job.job_id] = job
    # An audio job: a recorded clip, rendered as it is.
    clip = talker_pb2.AudioClip(
        format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
        audio=to_wav(piper_speech("This clip was recorded earlier."), 16_000),
    )
    audio_job = submit(gateway, "jobs-test-audio", scene="clip", avatar_id=avatar, audio=clip)
    assert audio_job.audio_ms > 1000
    jobs[audio_job.job_id] = audio_job
    # The fault: its avatar is deleted right after submission; every attempt fails.
    doomed = submit(
        gateway, "jobs-test-doomed", scene="doomed", avatar_id=doomed_avatar, script=SENTENCES[0]
    )
    animate.DeleteAvatar(animate_pb2.DeleteAvatarRequest(avatar_id=doomed_avatar), timeout=30)
    jobs[doomed.job_id] = doomed
    assert len(jobs) == 10
    # An eleventh job, cancelled while it waits behind the others.
    cancelled = submit(gateway, "jobs-test-cancel", scene="never", avatar_id=avatar, script="No.")
    response = gateway.CancelJob(talker_pb2.CancelJobRequest(job_id=cancelled.job_id), timeout=10)
    assert response.job.state == talker_pb2.JOB_STATE_CANCELLED

    # Kill -9 a worker in the middle of a job. Jobs take about a second here, so
    # the job it held is read back after the kill: RUNNING under the dead worker.
    victim_job = None
    deadline = time.monotonic() + 120
    while victim_job is None:
        assert time.monotonic() < deadline, "no kill landed mid-job"
        worker_pids = {int(jobs_system.ctl("pid", name).stdout.strip()) for name in WORKERS}
        running = [job for job in (get_job(gateway, i) for i in jobs) if job is not None]
        running = [job for job in running if job.state == talker_pb2.JOB_STATE_RUNNING]
        running = [job for job in running if int(job.worker.rsplit("-", 1)[1]) in worker_pids]
        if not running:
            time.sleep(0.05)
            continue
        victim = running[0].worker
        os.kill(int(victim.rsplit("-", 1)[1]), signal.SIGKILL)
        orphans = [get_job(gateway, job_id) for job_id in jobs]
        held = [
            j
            for j in orphans
            if j and j.state == talker_pb2.JOB_STATE_RUNNING and j.worker == victim
        ]
        print(f"killed worker {victim}; jobs it held: {[j.job_id for j in held]}")
        if held:
            victim_job = held[0]
        else:
            for name in WORKERS:
                jobs_system.wait_running(name)

    # Then Redis, once, while jobs are queued and running.
    time.sleep(2.0)
    redis_pid = kill_9(jobs_system, "redis")
    print(f"killed redis (pid {redis_pid})")
    jobs_system.wait_running("redis")

    # Every job ends.
    final: dict[str, talker_pb2.Job] = {}
    deadline = time.monotonic() + 240
    while len(final) < len(jobs):
        assert time.monotonic() < deadline, {
            job_id: talker_pb2.JobState.Name(job.state)
            for job_id, job in jobs.items()
            if job_id not in final
        }
        for job_id in jobs:
            if job_id not in final:
                job = get_job(gateway, job_id)
                if job is not None and job.state in FINAL:
                    final[job_id] = job
        time.sleep(0.5)
    print(f"all {len(final)} jobs ended after {time.monotonic() - started:.0f} s")
    for job in final.values():
        print(
            f"  {job.job_id} {talker_pb2.JobState.Name(job.state)} attempts={job.attempts} "
            f"worker={job.worker} {job.error.message[:100]}"
        )

    done = {job_id for job_id, job in final.items() if job.state == talker_pb2.JOB_STATE_DONE}
    assert done == set(jobs) - {doomed.job_id}, "every job but the doomed one is done"
    # The killed worker's job was taken over and finished by another attempt.
    assert final[victim_job.job_id].attempts >= 2
    assert final[victim_job.job_id].worker != victim_job.worker

    # The doomed job: 3 attempts, then the failed list, with its error and trace id.
    failed = final[doomed.job_id]
    assert failed.state == talker_pb2.JOB_STATE_FAILED and failed.attempts == 3
    assert failed.error.stage == talker_pb2.PIPELINE_STAGE_ANIMATE
    assert failed.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert doomed_avatar in failed.error.message and failed.error.trace_id == "jobs-test-doomed"
    failed_list = gateway.ListJobs(
        talker_pb2.ListJobsRequest(state=talker_pb2.JOB_STATE_FAILED), timeout=10
    ).jobs
    assert [job.job_id for job in failed_list] == [doomed.job_id]

    # The cancelled job never ran.
    cancelled_now = get_job(gateway, cancelled.job_id)
    assert cancelled_now is not None and cancelled_now.state == talker_pb2.JOB_STATE_CANCELLED
    assert cancelled_now.attempts == 0 and not cancelled_now.archive_path

    # None done twice: one mp4 + one record per done job, one "job done" log line each.
    archive = jobs_system.var_dir / "archive"
    videos = sorted(archive.glob(f"*/{USER}_*.mp4"))
    records = [json.loads(path.read_text()) for path in archive.glob(f"*/{USER}_*.json")]
    assert len(videos) == len(done) == len(records), [p.name for p in videos]
    assert Counter(record["job_id"] for record in records) == Counter(done)
    assert not list(archive.glob("*/*.partial*"))
    for job_id in done:
        job = final[job_id]
        assert Path(job.archive_path).exists(), job.archive_path
        record = json.loads(Path(job.archive_path).with_suffix(".json").read_text())
        assert record["job_id"] == job_id and record["trace_id"] == job.trace_id
        assert record["render"]["frame_count"] == job.result.frame_count > 0
    logs = "".join(jobs_system.log(name.split(":")[1]) for name in WORKERS)
    finished_lines = Counter(
        json.loads(line)["job_id"]
        for line in logs.splitlines()
        if line.startswith("{") and json.loads(line)["event"] == "job done"
    )
    assert finished_lines == Counter(done)
    # A done job plays: H.264 video and AAC audio of the same length.
    with av.open(final[audio_job.job_id].archive_path) as container:
        codecs = {s.type: s.codec_context.name for s in container.streams}
    assert codecs == {"video": "h264", "audio": "aac"}
    print(f"checked after {time.monotonic() - started:.0f} s")


def test_bad_job_requests_get_clear_errors(
    jobs_system: Supervisor,
    gateway: talker_pb2_grpc.TalkerServiceStub,
    animate: animate_pb2_grpc.AnimateServiceStub,
) -> None:
    def error_of(call: object, request: object) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)  # type: ignore[operator]
        return caught.value

    error = error_of(gateway.GetJob, talker_pb2.GetJobRequest(job_id="0123456789abcdef"))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "No job '0123456789abcdef'" in error.details()
    error = error_of(gateway.CancelJob, talker_pb2.CancelJobRequest(job_id="nope"))
    assert error.code() is grpc.StatusCode.NOT_FOUND

    done = gateway.ListJobs(
        talker_pb2.ListJobsRequest(state=talker_pb2.JOB_STATE_DONE, user_id=USER), timeout=10
    ).jobs
    assert done, "run after the first test: it leaves done jobs"
    error = error_of(gateway.CancelJob, talker_pb2.CancelJobRequest(job_id=done[0].job_id))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "has already ended (done)" in error.details()

    avatar = animate.ListAvatars(animate_pb2.ListAvatarsRequest(), timeout=10).avatars[0].avatar_id
    error = error_of(
        gateway.SubmitRender, talker_pb2.SubmitRenderRequest(avatar_id=avatar, script="x" * 5001)
    )
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "The script has 5001 characters; at most 5000 are accepted" in error.details()
    error = error_of(
        gateway.SubmitRender, talker_pb2.SubmitRenderRequest(avatar_id=avatar, script="   ")
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "script is empty" in error.details()
    error = error_of(gateway.SubmitRender, talker_pb2.SubmitRenderRequest(script="Hello."))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "avatar_id is required" in (
        error.details()
    )
    error = error_of(
        gateway.SubmitRender,
        talker_pb2.SubmitRenderRequest(avatar_id="avatar-nobody", script="Hello."),
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND and "avatar-nobody" in error.details()
    error = error_of(
        gateway.SubmitRender,
        talker_pb2.SubmitRenderRequest(avatar_id=avatar, script="Hello.", user_id="../etc"),
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "user_id" in error.details()
    error = error_of(gateway.ListJobs, talker_pb2.ListJobsRequest(page_token="not-a-token"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_grpcurl_submits_follows_and_lists_a_job(
    jobs_system: Supervisor, animate: animate_pb2_grpc.AnimateServiceStub
) -> None:
    """The README's operator examples, through server reflection (grpcurl prints
    proto field names)."""
    address = jobs_system.addresses["gateway"]
    avatar = animate.ListAvatars(animate_pb2.ListAvatarsRequest(), timeout=10).avatars[0].avatar_id

    def grpcurl(method: str, body: dict[str, object], *extra: str) -> dict:  # type: ignore[type-arg]
        result = subprocess.run(
            [str(VENV_BIN / "grpcurl"), "-plaintext", *extra, "-d", json.dumps(body), address,
             f"talker.v1.TalkerService/{method}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    submitted = grpcurl(
        "SubmitRender",
        {
            "user_id": "ops",
            "scene": "grpcurl",
            "avatar_id": avatar,
            "script": "Hello from the command line.",
            "priority": "JOB_PRIORITY_HIGH",
        },
        "-H", "x-trace-id: grpcurl-job",
    )  # fmt: skip
    job_id = submitted["job"]["job_id"]
    assert submitted["job"]["state"] == "JOB_STATE_QUEUED"
    deadline = time.monotonic() + 60
    while (job := grpcurl("GetJob", {"job_id": job_id})["job"])["state"] != "JOB_STATE_DONE":
        assert time.monotonic() < deadline and job["state"] != "JOB_STATE_FAILED", job
        time.sleep(0.3)
    assert job["archive_path"].endswith("_grpcurl.mp4") and job["trace_id"] == "grpcurl-job"
    assert job["result"]["video_codec"] == "h264"
    listed = grpcurl("ListJobs", {"user_id": "ops", "page_size": 5})
    assert [j["job_id"] for j in listed["jobs"]] == [job_id]
    result = subprocess.run(
        [str(VENV_BIN / "grpcurl"), "-plaintext", "-d", json.dumps({"job_id": job_id}), address,
         "talker.v1.TalkerService/CancelJob"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "FailedPrecondition" in result.stderr and "already ended (done)" in result.stderr
