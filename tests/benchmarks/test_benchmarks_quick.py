"""The benchmarks' `--quick` CPU modes run in the suite, so that they cannot rot (their numbers are not asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_gpu_check_runs_every_section_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    stdout = _run("gpu_check.py", "--device", "cpu", "--quick", "--output", str(out))
    report = json.loads(out.read_text())
    assert report["digits"]["resume_continued_exactly"] is True and report["digits"]["updates"] == 4
    assert report["folder-ours"]["learning_rate"] == 1.6e-3  # width-scaled: 1e-4 x 512 / 32 for the narrow UNet
    assert report["folder-ours"]["parameters_m"] == report["folder-diffusers"]["parameters_m"]
    rows = [row for row in report["sampling"].values() if isinstance(row, dict)]
    assert len(rows) == 6 and all(row["finite"] for row in rows)
    assert "loss_ratio_at_end (ours / diffusers)" in stdout


def test_bench_defaults_quick(tmp_path):
    out = tmp_path / "defaults.json"
    _run("bench_defaults.py", "--quick", "--output", str(out))
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"ours", "ours-small-preset", "diffusers"}
    assert report["runs"]["ours-small-preset"]["learning_rate"] == 2e-3


def test_bench_training_quick(tmp_path):
    out = tmp_path / "training.json"
    _run("bench_training.py", "--quick", "--output", str(out))
    report = json.loads(out.read_text())
    assert report["throughput_ratio"] > 0


def test_bench_training_gpu_runs_every_section_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = _run("bench_training_gpu.py", "--device", "cpu", "--quick", "--output", str(out))
    report = json.loads(out.read_text())
    assert set(report["train"]) == {"diffusers", "ours"}
    assert report["train"]["diffusers"]["source"].startswith("re-created loop")  # and the output says so
    assert "diffusers side: re-created loop" in stdout and "ours / diffusers" in stdout
    for row in report["train"].values():
        assert row["images_per_s"] > 0 and row["flops_per_image"] > 0 and row["loss_at_end"] > 0
    rows = {k: v for k, v in report["sample"]["rows"].items() if k != "diffusers_failures"}
    assert len(rows) == 6 and all(r["ours_s"] > 0 for r in rows.values())


def test_bench_training_gpu_runs_a_training_script_and_stops_it_after_the_last_update(tmp_path):
    # A stand-in for diffusers' script (the real one needs torchvision): it logs a loss per update, forever.
    script = tmp_path / "stand_in_train_unconditional.py"
    script.write_text(
        "import sys\n"
        "from accelerate import Accelerator\n"
        "assert sys.argv[sys.argv.index('--train_batch_size') + 1] == '4'\n"
        "accelerator, step = Accelerator(cpu=True), 0\n"
        "while True:\n"
        "    step += 1\n"
        "    accelerator.log({'loss': 1.0 / step, 'lr': 1e-4, 'step': step}, step=step)\n"
    )
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_training_gpu
    finally:
        sys.path.pop(0)
    s = bench_training_gpu.sizes(quick=True, device="cpu")
    result = bench_training_gpu.run_diffusers_script(str(script), str(tmp_path), "unet.json", s, str(tmp_path / "out"))
    assert result["losses"] == [1.0 / step for step in range(1, s["steps"] + 1)]
    assert sorted(result["marks"]) == [s["warmup"], s["steps"]]


def test_bench_samplers_trained_networks_quick():
    stdout = _run("bench_samplers.py", "--quick", "--sections", "trained")
    assert "ours DPM++ 2M (defaults)" in stdout and "diffusers UniPC" in stdout
    assert stdout.count("evaluations: ours (defaults)") == 3  # 5, 10 and 20 evaluations
    assert stdout.count("distance to the PF-ODE solution: ours (defaults)") == 3


def test_bench_schedulers_quick():
    stdout = _run("bench_schedulers.py", "--quick", "--threads", "1")
    for case in ("DDPM", "DDIM eta=0", "DDIM eta=1"):
        assert f"step {case}, batch 64" in stdout and f"set_timesteps cold {case}, N=1000" in stdout


def test_bench_pipelines_quick():
    stdout = _run("bench_pipelines.py", "--quick")
    for case in ("ours + TutorialDDIMScheduler", "diffusers DDIMPipeline", "ours + TutorialDDPMScheduler"):
        assert f"| {case} |" in stdout
    assert "| channels_last |" in stdout


def test_bench_data_quick(tmp_path):
    out = tmp_path / "data.json"
    stdout = _run("bench_data.py", "--quick", "--work_dir", str(tmp_path / "work"), "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    for n in (48, 96):
        runs = {row["path"]: row for row in rows if row["num_images"] == n}
        assert set(runs) == {"diffusers", "memory", "workers", "cache-first", "cache-rerun"}
        for row in runs.values():
            for key in ("peak_mb", "self_mb", "first_update_s", "first_batch_s", "items_per_s"):
                assert row[key] > 0, (row["path"], key)
    assert "goals of issue 20" in stdout and "ours / diffusers" in stdout


def test_bench_distill_quick():
    stdout = _run("bench_distill.py", "--quick")
    assert "ours DPM-Solver++ (defaults)" in stdout and "diffusers UniPC" in stdout
    # table rows (the verdict lines below the table name the same students again)
    assert stdout.count("| progressive: the ") == 3 and stdout.count("| consistency: final student") == 3  # 1, 2, 4
    assert stdout.count(" step(s): FD ") == 9 and "PF-ODE, Dormand-Prince (the reference)" in stdout


def test_bench_inverse_quick(tmp_path):
    out = tmp_path / "inverse.json"
    stdout = _run("bench_inverse.py", "--quick", "--json", str(out))
    report = json.loads(out.read_text())
    assert len(report["mixture"]) == 2 * 3 * 2 * 6  # priors x operators x σ_y x method settings
    assert set(report["digits"]) == {"sr", "deblur"}
    assert "SR3 digits-sr3 (DDIM-2, noise_level 0)" in report["digits"]["sr"]["rows"]
    assert set(report["timing"]["rows"]) == {"ddnm", "ddrm", "dps", "pigdm", "RePaint", "SR3 (x4 SR, not inpainting)"}
    assert "DDNM's noiseless consistency" in stdout and "exact-in-the-limit rows that converge" in stdout


def test_bench_latent_quick(tmp_path):
    out = tmp_path / "latent.json"
    stdout = _run("bench_latent.py", "--quick", "--output", str(out), "--work_dir", str(tmp_path / "runs"))
    report = json.loads(out.read_text())
    assert report["autoencoder"]["psnr_db"] > 40  # the shipped digits-vae: 42.2 dB on the held-out digits
    assert set(report["runs"]) == {"latent", "pixel"}
    for run in report["runs"].values():
        assert run["updates"] >= 1 and run["fd"] > 0 and run["sampling_ms_per_image"] > 0
    assert "FD latent / pixel = " in stdout and "sampling speed-up latent = " in stdout
