"""Render jobs: throughput of the durable queue with 1 and then 2 workers, in
one run, every program a real process under supervisord with a real Redis.

Each round submits the same batch of one-sentence script jobs at once through
the gateway (SubmitRender) and polls GetJob until all are done. Jobs per
minute = batch / (last end - first submit). Job time is a job's own run
(start to end, speaking + rendering + archiving); queue wait is submit to start.
With 1 worker the second one is stopped (`supervisorctl stop`), then started
again for the 2-worker round. Both workers share one Synthesize and one
Animate process: a second worker helps as far as those have cores to spare."""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import grpc
from PIL import Image
from skimage import data

from bench.tables import percentile, print_table
from talker.v1 import animate_pb2, animate_pb2_grpc, talker_pb2, talker_pb2_grpc
from tests.processes import Supervisor

SCRIPTS = [
    "Welcome to the product tour.",
    "Today we look at the new dashboard.",
    "Every chart updates in real time.",
    "You can share a view with one click.",
    "Reports are ready every morning.",
    "Alerts reach you on your phone.",
    "Your data stays on your servers.",
    "Thank you for watching.",
]
JOBS = int(os.environ.get("TALKER_BENCH_JOBS", "8"))
FINAL = {talker_pb2.JOB_STATE_DONE, talker_pb2.JOB_STATE_FAILED, talker_pb2.JOB_STATE_CANCELLED}


def ms(stamp: object) -> float:
    return float(stamp.ToMilliseconds())  # type: ignore[attr-defined]


def run_round(gateway: talker_pb2_grpc.TalkerServiceStub, avatar_id: str, workers: int) -> list:  # type: ignore[type-arg]
    started = time.time()
    ids = []
    for i in range(JOBS):
        request = talker_pb2.SubmitRenderRequest(
            user_id="bench",
            scene=f"w{workers}",
            avatar_id=avatar_id,
            script=SCRIPTS[i % len(SCRIPTS)],
        )
        ids.append(gateway.SubmitRender(request, timeout=30).job.job_id)
    jobs: dict[str, talker_pb2.Job] = {}
    while len(jobs) < len(ids):
        for job_id in ids:
            if job_id not in jobs:
                job = gateway.GetJob(talker_pb2.GetJobRequest(job_id=job_id), timeout=10).job
                if job.state in FINAL:
                    jobs[job_id] = job
        time.sleep(0.2)
    done = [job for job in jobs.values() if job.state == talker_pb2.JOB_STATE_DONE]
    last_end = max(ms(job.end_time) for job in jobs.values()) / 1000
    wall_s = last_end - started
    run_s = [(ms(j.end_time) - ms(j.start_time)) / 1000 for j in done]
    wait_s = [(ms(j.start_time) - ms(j.create_time)) / 1000 for j in done]
    video_s = sum(j.result.duration_ms for j in done) / 1000
    return [
        workers,
        len(done),
        len(jobs) - len(done),
        round(wall_s, 1),
        round(len(done) / wall_s * 60, 1),
        round(percentile(run_s, 50), 2),
        round(percentile(wait_s, 50), 2),
        round(video_s / wall_s, 2),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="talker-bench-") as folder:
        system = Supervisor(Path(folder), env={"TALKER_JOBS_WORKERS": "2"})
        system.start()
        try:
            for address in system.addresses.values():
                system.wait_status(address, timeout_s=300)
            for name in ("talker:worker_00", "talker:worker_01", "redis"):
                system.wait_running(name)
            buffer = io.BytesIO()
            Image.fromarray(data.astronaut()).save(buffer, format="PNG")
            animate = animate_pb2_grpc.AnimateServiceStub(
                grpc.insecure_channel(system.addresses["animate"])
            )
            avatar_id = animate.CreateAvatar(
                animate_pb2.CreateAvatarRequest(image=buffer.getvalue(), display_name="bench"),
                timeout=120,
            ).avatar.avatar_id
            gateway = talker_pb2_grpc.TalkerServiceStub(
                grpc.insecure_channel(system.addresses["gateway"])
            )
            # Warm-up: the first render pays for lazy loading in Animate.
            run_round(gateway, avatar_id, 2)
            system.ctl("stop", "talker:worker_01")
            rows = [run_round(gateway, avatar_id, 1)]
            system.ctl("start", "talker:worker_01")
            system.wait_running("talker:worker_01")
            rows.append(run_round(gateway, avatar_id, 2))
        finally:
            system.stop()
    print_table(
        f"Render jobs: {JOBS} one-sentence scripts per round, {os.cpu_count()} cores",
        [
            "workers",
            "done",
            "failed",
            "wall s",
            "jobs/min",
            "p50 job s",
            "p50 queue wait s",
            "video s per wall s",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
