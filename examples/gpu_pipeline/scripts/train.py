"""A stand-in for a GPU training step: reads the shared input, reports the GPU it was given."""

import hashlib
import os
import subprocess
import time

sm = snakemake  # noqa: F821 (injected by Snakemake's script: directive)
with open(sm.input.shared, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
try:
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    ).stdout.strip() or "none"
except (OSError, subprocess.SubprocessError):
    gpu = "none"
time.sleep(float(sm.params.seconds))
with open(sm.output[0], "w") as out:
    out.write(f"sample={sm.wildcards.i} shared={digest} gpu={gpu} "
              f"cuda_visible_devices={os.environ.get('CUDA_VISIBLE_DEVICES', '')}\n")
with open(sm.log[0], "w") as log:
    log.write(f"trained sample {sm.wildcards.i} on {gpu}\n")
