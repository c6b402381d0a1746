import subprocess
import sys


def test_sync_core_and_records_import_no_ray_vllm_deepspeed():
    code = ("import sys, rlhf_ray.buckets, rlhf_ray.sync, rlhf_ray.sync.collective, rlhf_ray.records; "
            "bad = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
