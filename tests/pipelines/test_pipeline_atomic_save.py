"""`save_pretrained` into a folder that holds an earlier save (issue 11.9).

The new save is written to a staging folder and swapped in entry by entry, `model_index.json` last. What the earlier
save wrote and the new one does not (an fp16 variant, a shard index, samples, another pipeline's code) is removed;
what the pipeline does not own (a training run's checkpoints, logs, metrics, a user's files) is never touched. A save
that fails part-way leaves the earlier save as it was, and where two paths can be exchanged atomically (Linux) the
folder loads at every moment of the swap, each component whole.
"""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from custom_pipelines import (
    TutorialClassConditionalPipeline,
    TutorialUnconditionalPipeline,
    tutorial_pipeline_folder,
    tutorial_pipeline_saving,
)
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler

STEPS, SEED = 3, 5
# What a training run's --output_dir holds besides the pipeline, and a user's own file: never touched by a save.
NOT_OWNED = {
    "checkpoint-5/training_state.json": b'{"global_step": 5}',
    "checkpoint-5/model.safetensors": b"weights of a checkpoint",
    "logs/events.out.tfevents.1": b"tensorboard",
    "grids/step_000005.png": b"a grid",
    "metrics.json": b'{"frechet_distance": 49.0}',
    "losses.jsonl": b'{"step": 1, "loss": 0.5}\n',
    "notes.txt": b"the user's own notes",
}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _add_not_owned(folder: Path) -> None:
    for rel, data in NOT_OWNED.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _images(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, output_type="pt"
    ).images


@pytest.fixture
def old_pipe(unet_factory):
    return TutorialUnconditionalPipeline(unet=unet_factory(seed=1), scheduler=TutorialDDPMScheduler())


@pytest.fixture
def new_pipe(unet_factory):
    scheduler = TutorialDDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    return TutorialUnconditionalPipeline(unet=unet_factory(seed=2), scheduler=scheduler)


# ---- stale files of the earlier save are removed, files the pipeline does not own are kept -----------------------------
def _old_fp16_variant(pipe, unet_factory, folder):
    pipe.save_pretrained(folder, variant="fp16")


def _old_sharded(pipe, unet_factory, folder):
    pipe.save_pretrained(folder, max_shard_size="30KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()


def _old_with_more_samples(pipe, unet_factory, folder):
    pipe.save_pretrained(folder, sample_images=torch.rand(3, 3, 8, 8))


def _old_class_conditional(pipe, unet_factory, folder):
    cond = TutorialClassConditionalPipeline(unet=unet_factory(seed=3, num_class_embeds=3), scheduler=DDPMScheduler())
    cond.save_pretrained(folder, sample_images=torch.rand(1, 3, 8, 8))


def _old_with_a_diffusers_scheduler(pipe, unet_factory, folder):
    TutorialUnconditionalPipeline(unet=pipe.unet, scheduler=DDPMScheduler()).save_pretrained(folder)


def _old_killed_mid_save(pipe, unet_factory, folder):
    pipe.save_pretrained(folder)
    leftover = folder / f"{tutorial_pipeline_folder.SAVE_STAGING_PREFIX}killed"  # a staging folder of a killed save
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")


@pytest.mark.parametrize(
    "make_old",
    [
        _old_fp16_variant,
        _old_sharded,
        _old_with_more_samples,
        _old_class_conditional,
        _old_with_a_diffusers_scheduler,
        _old_killed_mid_save,
    ],
)
def test_a_new_save_replaces_the_old_one_exactly_and_keeps_what_it_does_not_own(
    make_old, old_pipe, new_pipe, unet_factory, tmp_path
):
    folder, reference = tmp_path / "out", tmp_path / "reference"
    folder.mkdir()
    _add_not_owned(folder)
    make_old(old_pipe, unet_factory, folder)
    samples = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    new_pipe.save_pretrained(folder, sample_images=samples)
    new_pipe.save_pretrained(reference, sample_images=samples)  # the same save into an empty folder

    # Byte for byte: the new save and the files it does not own, nothing else (no stale variant, shard, sample, code).
    assert _tree(folder) == {**_tree(reference), **NOT_OWNED}
    loaded = TutorialUnconditionalPipeline.from_pretrained(folder)
    torch.testing.assert_close(_images(loaded), _images(new_pipe), rtol=0, atol=0)
    if make_old is _old_fp16_variant:  # the old fp16 weights are gone: asking for them fails instead of loading them
        with pytest.raises((OSError, ValueError), match="fp16"):
            TutorialUnconditionalPipeline.from_pretrained(folder, variant="fp16")


def test_saving_twice_with_the_same_folder_is_idempotent(new_pipe, tmp_path):
    new_pipe.save_pretrained(tmp_path / "out", sample_images=torch.rand(1, 3, 8, 8))
    first = _tree(tmp_path / "out")
    new_pipe.save_pretrained(tmp_path / "out", sample_images=torch.rand(1, 3, 8, 8))
    assert sorted(_tree(tmp_path / "out")) == sorted(first)


def test_save_directory_that_is_a_file_is_refused(new_pipe, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"save_directory='.*a_file' is a file"):
        new_pipe.save_pretrained(tmp_path / "a_file")


# ---- a save that fails part-way leaves the earlier save untouched ------------------------------------------------------
def _fail_while_writing_weights(monkeypatch):
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a torn file, then the disk fills up
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)


def _fail_while_shipping_scheduler_code(monkeypatch):
    real_copy = shutil.copyfile

    def copy(src, dst, *args, **kwargs):
        if "scheduler" in str(dst):
            raise OSError(5, "Input/output error (injected)")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(tutorial_pipeline_saving.shutil, "copyfile", copy)


def _fail_while_writing_samples(monkeypatch):
    def fail(images, folder):
        (Path(folder) / "samples").mkdir(exist_ok=True)
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(tutorial_pipeline_saving, "_write_sample_images", fail)


FAULTS = {
    "weights": _fail_while_writing_weights,
    "scheduler_code": _fail_while_shipping_scheduler_code,
    "samples": _fail_while_writing_samples,
}


def test_a_save_that_fails_midway_leaves_the_old_save_loadable_in_a_fresh_process(
    old_pipe, new_pipe, tmp_path, fresh_python
):
    torch.save(_images(old_pipe), tmp_path / "old.pt")
    for name, inject in FAULTS.items():
        folder = tmp_path / name
        folder.mkdir()
        _add_not_owned(folder)
        old_pipe.save_pretrained(folder, sample_images=torch.rand(1, 3, 8, 8))
        before = _tree(folder)
        with pytest.MonkeyPatch.context() as mp:
            inject(mp)
            with pytest.raises(tutorial_pipeline_saving.PipelineSaveError, match="injected") as caught:
                new_pipe.save_pretrained(folder, sample_images=torch.rand(2, 3, 8, 8))
        assert f"Could not save the pipeline to {str(folder)!r} (writing the save): OSError: " in str(caught.value)
        assert _tree(folder) == before, name  # every file as it was, no staging folder left behind
        assert sorted(p.name for p in folder.iterdir()) == sorted({p.name for p in (tmp_path / name).iterdir()})

    script = f"""
    import json, torch
    from diffusers import DiffusionPipeline
    old = torch.load({str(tmp_path / "old.pt")!r})
    res = {{}}
    for name in {sorted(FAULTS)!r}:
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed({SEED}), num_inference_steps={STEPS},
                      output_type="pt").images
        res[name] = float((images - old).abs().max())
    print("RESULT:" + json.dumps(res))
    """
    assert fresh_python(script, tmp_path, block_our_packages=True) == {name: 0.0 for name in FAULTS}


def test_a_full_disk_while_writing_a_config_names_the_folder_and_the_cause(old_pipe, new_pipe, tmp_path, monkeypatch):
    """ENOSPC from `open` (diffusers writes each component's config with it): an OSError naming the folder, the step
    and the cause; no staging folder left; the earlier save as it was and loading."""
    import builtins

    folder = tmp_path / "out"
    folder.mkdir()
    _add_not_owned(folder)
    old_pipe.save_pretrained(folder)
    before = _tree(folder)
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith("scheduler_config.json"):
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(tutorial_pipeline_saving.PipelineSaveError) as caught:
        new_pipe.save_pretrained(folder)
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"Could not save the pipeline to {str(folder)!r} (writing the save): OSError: ")
    assert "No space left on device" in message and "scheduler_config.json" in message
    assert caught.value.errno == 28 and isinstance(caught.value, OSError)
    assert _tree(folder) == before  # no staging folder, every file as it was
    torch.testing.assert_close(
        _images(TutorialUnconditionalPipeline.from_pretrained(folder)), _images(old_pipe), rtol=0, atol=0
    )


def test_a_write_error_in_safetensors_own_writer_names_the_folder(old_pipe, new_pipe, tmp_path, fresh_python):
    """A real I/O error inside safetensors' writer (a file-size limit, as a full disk would stop it) arrives as its
    `SafetensorError`, not an `OSError`: it too becomes a PipelineSaveError naming the folder, and nothing is left."""
    folder = tmp_path / "out"
    folder.mkdir()
    _add_not_owned(folder)
    old_pipe.save_pretrained(folder)
    new_pipe.save_pretrained(tmp_path / "new_unet_only")
    torch.save(_images(old_pipe), tmp_path / "old.pt")
    weights = (tmp_path / "new_unet_only" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    limit = weights // 2  # below the weights, above every config and code file
    assert limit > max(p.stat().st_size for p in (tmp_path / "new_unet_only").rglob("*") if p.suffix != ".safetensors")
    script = f"""
    import json, resource, signal, torch
    from pathlib import Path
    from diffusers import UNet2DModel
    from custom_pipelines import TutorialUnconditionalPipeline, tutorial_pipeline_saving
    from schedulers import TutorialDDIMScheduler

    folder = Path({str(folder)!r})
    tree = lambda: {{str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}}
    before = tree()
    new = TutorialUnconditionalPipeline(unet=UNet2DModel.from_pretrained({str(tmp_path / "new_unet_only")!r},
                                        subfolder="unet"), scheduler=TutorialDDIMScheduler())
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, hard))
    try:
        new.save_pretrained(folder)
        error = None
    except Exception as err:
        error = dict(type=type(err).__name__, is_oserror=isinstance(err, OSError), message=str(err),
                     cause=type(err.__cause__).__name__)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    pipe = TutorialUnconditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed({SEED}), num_inference_steps={STEPS},
                  output_type="pt").images
    print("RESULT:" + json.dumps(dict(error=error, unchanged=tree() == before,
                                      max_diff=float((images - torch.load({str(tmp_path / "old.pt")!r})).abs().max()))))
    """
    res = fresh_python(script, tmp_path)
    error = res["error"]
    assert error is not None, "the save under the file-size limit did not fail"
    assert error["type"] == "PipelineSaveError" and error["is_oserror"] and error["cause"] == "SafetensorError"
    assert error["message"].startswith(f"Could not save the pipeline to {str(folder)!r} (writing the save): ")
    assert "File too large" in error["message"]
    assert res["unchanged"] and res["max_diff"] == 0.0


# ---- save_pretrained(..., push_to_hub=True) uploads only what the save wrote -------------------------------------------
def test_save_with_push_to_hub_uploads_only_the_files_of_the_save(old_pipe, new_pipe, tmp_path, monkeypatch):
    """The Hub is simulated at huggingface_hub's boundary; `upload_folder` selects files as huggingface_hub does
    (`filter_repo_objects` with the call's `allow_patterns` / `ignore_patterns`)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    uploads = []

    def create_repo(api, repo_id, private=None, exist_ok=False, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(api, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = _tree(Path(folder_path))
        chosen = filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        uploads.append(dict(repo_id=repo_id, files={rel: files[rel] for rel in chosen}))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    folder, reference = tmp_path / "run", tmp_path / "reference"
    folder.mkdir()
    _add_not_owned(folder)
    (folder / "previous-run").mkdir()  # a run set aside, with its own pipeline files
    (folder / "previous-run" / "model_index.json").write_text("{}")
    old_pipe.save_pretrained(folder, variant="fp16", sample_images=torch.rand(3, 3, 8, 8))  # stale files to remove

    samples = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    new_pipe.save_pretrained(folder, sample_images=samples, push_to_hub=True, repo_id="me/tiny")
    new_pipe.save_pretrained(reference, sample_images=samples, repo_id="me/tiny")

    (upload,) = uploads
    assert upload["repo_id"] == "me/tiny"
    assert upload["files"] == _tree(reference)  # the save's files, byte for byte, and nothing else


# ---- every moment of the swap: each entry whole, model_index.json last --------------------------------------------------
def _visible(tree: dict) -> dict:
    """A folder's files without the staging folder of the save in progress."""
    return {k: v for k, v in tree.items() if not k.startswith(tutorial_pipeline_folder.SAVE_STAGING_PREFIX)}


def _can_exchange(folder: Path) -> bool:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    try:
        return tutorial_pipeline_folder._exchange(str(folder / "a"), str(folder / "b"))
    finally:
        shutil.rmtree(folder / "a")
        shutil.rmtree(folder / "b")


def test_every_moment_of_the_swap_leaves_a_folder_that_loads(old_pipe, new_pipe, tmp_path, monkeypatch, fresh_python):
    """Snapshot the folder before every rename of the save (where a kill could stop it) and load each snapshot.

    Each component is the old one or the new one, never torn or missing; `model_index.json` is the old one until the
    commit (the last rename of the swap), and from then on every file of the new save is in place.
    """
    if not _can_exchange(tmp_path):
        pytest.skip("no atomic exchange of two paths here (Linux renameat2): a folder is briefly absent in the swap")
    folder, snapshots = tmp_path / "out", tmp_path / "snapshots"
    folder.mkdir()
    _add_not_owned(folder)
    old_pipe.save_pretrained(folder, sample_images=torch.rand(3, 3, 8, 8))
    old_tree = _tree(folder)

    def snapshot():
        shutil.copytree(folder, snapshots / f"{len(list(snapshots.iterdir())):02d}", symlinks=True)

    snapshots.mkdir()
    for name in ("rename", "replace"):
        real = getattr(tutorial_pipeline_folder.os, name)

        def wrapped(src, dst, *args, _real=real, **kwargs):
            snapshot()
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(tutorial_pipeline_folder.os, name, wrapped)
    real_exchange = tutorial_pipeline_folder._exchange

    def exchange(a, b):
        snapshot()
        return real_exchange(a, b)

    monkeypatch.setattr(tutorial_pipeline_folder, "_exchange", exchange)
    new_pipe.save_pretrained(folder, sample_images=torch.rand(2, 3, 8, 8))
    monkeypatch.undo()
    snapshot()  # the end state
    new_tree = _tree(folder)
    states = sorted(snapshots.iterdir())
    assert len(states) >= 5
    assert _visible(_tree(states[0])) == old_tree and _tree(states[-1]) == new_tree

    def whole(tree, name):
        """ "old" or "new" when the component folder `name` is exactly one of the two, else None.

        A new folder may also hold code files of the old one, copied there so that the old model_index.json
        still finds its module (they are removed after the commit).
        """
        prefix = name + "/"
        comp, old, new = ({k: v for k, v in t.items() if k.startswith(prefix)} for t in (tree, old_tree, new_tree))
        extra = {k: v for k, v in comp.items() if k not in new}
        if comp == old:
            return "old"
        if (
            {k: comp.get(k) for k in new} == new
            and extra.items() <= old.items()
            and all(k.endswith(".py") for k in extra)
        ):
            return "new"
        return None

    origin, committed = {}, False
    for state in states:
        tree = _visible(_tree(state))
        for rel, data in NOT_OWNED.items():
            assert tree[rel] == data, (state.name, rel)
        committed = committed or tree["model_index.json"] == new_tree["model_index.json"]
        origin[state.name] = {whole(tree, "unet"), whole(tree, "scheduler"), "new" if committed else "old"}
        assert None not in origin[state.name], state.name  # each component whole, never torn or missing
        if committed:  # every file of the new save in place; what remains of the old one goes, a rename at a time
            assert {k: tree.get(k) for k in new_tree} == new_tree and set(tree) <= set(new_tree) | set(old_tree)
        else:
            assert tree["model_index.json"] == old_tree["model_index.json"], state.name
    assert committed and origin[states[0].name] == {"old"}

    torch.save(_images(old_pipe), tmp_path / "old.pt")
    torch.save(_images(new_pipe), tmp_path / "new.pt")
    script = f"""
    import json, os, torch
    from diffusers import DiffusionPipeline
    old, new = torch.load({str(tmp_path / "old.pt")!r}), torch.load({str(tmp_path / "new.pt")!r})
    res = {{}}
    for state in sorted(os.listdir({str(snapshots)!r})):
        pipe = DiffusionPipeline.from_pretrained(os.path.join({str(snapshots)!r}, state), trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed({SEED}), num_inference_steps={STEPS},
                      output_type="pt").images
        res[state] = [float((images - old).abs().max()), float((images - new).abs().max())]
    print("RESULT:" + json.dumps(res))
    """
    res = fresh_python(script, tmp_path, block_our_packages=True)
    assert sorted(res) == [state.name for state in states]  # every state loaded with diffusers alone, and sampled
    for name, (diff_old, diff_new) in res.items():
        if origin[name] == {"old"}:  # old UNet, scheduler and model_index.json: the old images; all new: the new ones
            assert diff_old == 0.0, name
        elif origin[name] == {"new"}:
            assert diff_new == 0.0, name


def test_without_an_atomic_exchange_the_swap_still_ends_in_the_new_save(old_pipe, new_pipe, tmp_path, monkeypatch):
    """Where the system cannot swap two paths in one step, a folder is moved aside, then the new one moved in."""
    monkeypatch.setattr(tutorial_pipeline_folder, "_exchange", lambda a, b: False)
    folder, reference = tmp_path / "out", tmp_path / "reference"
    folder.mkdir()
    _add_not_owned(folder)
    old_pipe.save_pretrained(folder, variant="fp16", sample_images=torch.rand(3, 3, 8, 8))
    new_pipe.save_pretrained(folder)
    new_pipe.save_pretrained(reference)
    assert _tree(folder) == {**_tree(reference), **NOT_OWNED}
