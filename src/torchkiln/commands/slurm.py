"""SLURM: the job's warning signal (`sbatch --signal=USR1@90`) checkpoints the run and requeues the job.

Each worker handles SIGUSR1 like SIGTERM (finish the step, write last.ckpt, stop; under several
processes the ranks agree on the stop first). Rank 0 then asks SLURM to requeue the job
(`scontrol requeue $SLURM_JOB_ID`); the requeued job starts with `kiln train --resume auto` and
continues from that checkpoint. Outside SLURM the signal only stops the run with its checkpoint.
See examples/slurm/train.sbatch.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

log = logging.getLogger("torchkiln")
WARNING_SIGNAL = signal.SIGUSR1


def requeue_after(signum: int) -> bool:
    """After a stop by SLURM's warning signal: rank 0 requeues the job. True when requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if signum != WARNING_SIGNAL or not job or int(os.environ.get("RANK", 0)) != 0:
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.error("SLURM job %s: the checkpoint is written, but scontrol is not on PATH to requeue the job;"
                  " resubmit it (it resumes with --resume auto)", job)
        return False
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%s); resubmit the job (it resumes with --resume auto)", job,
                  (done.stderr or done.stdout).strip().splitlines()[-1:] or done.returncode)
        return False
    log.warning("SLURM job %s requeued; its next start resumes from the checkpoint (--resume auto)", job)
    return True
