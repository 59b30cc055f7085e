"""`--streaming`: training on a `datasets` stream (parquet or webdataset shards, an image folder, a `save_to_disk`
folder), each process its own share, broken records named, and resume exact (the loss record bit-identical) mid-pass
and after a pass has wrapped around, with decoding threads."""

import io
import itertools
import json
import logging
import tarfile

import numpy as np
import pytest
import torch

from training import train_unconditional as tu
from training.data.streaming import StreamBatches, open_stream
from training.settings import parse_args

from .conftest import read_losses, tiny_args

SHARDS, PER_SHARD = 4, 16  # 64 records of 8x8 grayscale; each record's label is its index


def _images(n, seed):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (8, 8), dtype=np.uint8), mode="L") for _ in range(n)]


def _features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def _write_parquet_shards(folder, broken_label=None):
    """4 parquet shards of 16 records; the record labelled `broken_label` holds bytes that are not an image."""
    import datasets

    folder.mkdir()
    for s in range(SHARDS):
        labels = list(range(s * PER_SHARD, (s + 1) * PER_SHARD))
        images = [{"bytes": b"not an image", "path": "broken.png"} if i == broken_label else None for i in labels]
        ds = datasets.Dataset.from_dict(
            {"image": [im or pil for im, pil in zip(images, _images(PER_SHARD, s))], "label": labels},
            features=_features(),
        )
        ds.to_parquet(str(folder / f"train-{s:05d}-of-{SHARDS:05d}.parquet"))
    return folder


@pytest.fixture(autouse=True)
def _no_pause_at_the_end_of_a_pass(monkeypatch):
    """`datasets` sleeps 5 s when a stream of interleaved parquet shards ends (its workaround for apache/arrow#45214):
    every pass, here many passes a second."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write_parquet_shards(tmp_path_factory.mktemp("stream") / "shards")


def _settings(*argv):
    return parse_args(["--streaming", "--num_channels", "1", "--resolution", "8", "--max_train_steps", "4", *argv])


def _labels_of_one_pass(settings, rank, world, stream_epoch=0):
    return [int(r["label"]) for r in open_stream(settings, rank, world).records(stream_epoch)]


def test_trains_on_parquet_shards_and_logs_the_streaming_path(tmp_path, tiny_config, shards, caplog):
    caplog.set_level(logging.INFO, logger="train_unconditional")
    argv = ["--streaming", "--dataset_name", shards, "--num_channels", 1, "--max_train_steps", 3]
    result = tu.main(tiny_args(tiny_config, tmp_path / "run", *argv))
    assert result["global_step"] == 3 and sorted(read_losses(tmp_path / "run")) == [1, 2, 3]
    assert "data path: streaming" in caplog.text and "4 shard(s) split over 1 process(es)" in caplog.text
    assert (tmp_path / "run" / "model_index.json").exists()


def _stream_args(tiny_config, output_dir, *extra, whole_stream=False):
    """`tiny_args` for a stream; `whole_stream` drops its `--max_train_samples` (no `take`: shards shuffled)."""
    argv = tiny_args(tiny_config, output_dir, "--streaming", "--num_channels", 1, *extra)
    if whole_stream:
        i = argv.index("--max_train_samples")
        del argv[i : i + 2]
    return argv


@pytest.mark.parametrize(
    "whole_stream, extra, stops, steps, replays",
    [
        # --max_train_samples 28 (a `take`: shard order fixed): a pass is 3 batches of 8, the last 4 records
        # dropped. Stops at update 2 (mid pass 0) and 4 (pass 1, after the wrap-around); the run ends in pass 2.
        (False, ["--max_train_samples", 28], (2, 4), 7, ((16, 0), (8, 1))),
        # The whole stream (64 records, shard order reshuffled every pass): 2 batches of 24 a pass, 16 dropped.
        (True, ["--train_batch_size", 24], (1, 3), 5, ((24, 0), (24, 1))),
    ],
    ids=["take", "whole"],
)
def test_resume_is_exact_mid_pass_and_after_the_stream_wraps_around_with_threads(
    tmp_path, tiny_config, shards, caplog, whole_stream, extra, stops, steps, replays
):
    caplog.set_level(logging.INFO, logger="train_unconditional")
    common = [
        "--dataset_name",
        shards,
        *extra,
        "--shuffle_buffer_size",
        8,
        "--dataloader_num_workers",
        2,
        "--random_flip",
        "--max_train_steps",
        steps,
        "--checkpointing_steps",
        100,
        "--seed",
        5,
    ]
    full = tu.main(_stream_args(tiny_config, tmp_path / "full", *common, whole_stream=whole_stream))
    assert full["global_step"] == steps and "decoded in 2 thread(s)" in caplog.text
    cut = tmp_path / "cut"
    result = tu.main(_stream_args(tiny_config, cut, *common, whole_stream=whole_stream), should_stop=stops[0].__eq__)
    assert result["interrupted"] and result["global_step"] == stops[0]
    resume = _stream_args(tiny_config, cut, *common, "--resume_from_checkpoint", "latest", whole_stream=whole_stream)
    result = tu.main(resume, should_stop=stops[1].__eq__)
    assert result["interrupted"] and result["global_step"] == stops[1]
    assert tu.main(resume)["global_step"] == steps
    losses = read_losses(cut)
    assert sorted(losses) == list(range(1, steps + 1)) and losses == read_losses(tmp_path / "full")  # bit-for-bit
    for records, stream_epoch in replays:
        assert f"replaying {records} record(s) of stream epoch {stream_epoch}" in caplog.text


def test_each_process_reads_a_disjoint_share_and_together_all_records(shards):
    # 4 shards: whole shards per process for 2 processes, every 3rd record for 3 (split_dataset_by_node's "auto").
    for extra, total in (([], SHARDS * PER_SHARD), (["--max_train_samples", "20"], 20)):
        settings = _settings("--dataset_name", str(shards), "--shuffle_buffer_size", "8", *extra)
        alone = _labels_of_one_pass(settings, 0, 1)
        assert sorted(alone) == sorted(set(alone)) and len(alone) == total
        for world in (2, 3):
            shares = [_labels_of_one_pass(settings, rank, world) for rank in range(world)]
            assert all(len(share) >= total // world for share in shares)
            every = [label for share in shares for label in share]
            assert len(every) == len(set(every)) == total  # disjoint, and none missing
        assert _labels_of_one_pass(settings, 2, 3) == shares[2]  # the same order every time
        assert _labels_of_one_pass(settings, 0, 1, stream_epoch=1) != alone  # the buffer is reseeded every pass


def _write_webdataset(folder, shards=2, per_shard=6):
    """Tar shards of `{key}.png` + `{key}.cls` (webdataset's layout)."""
    folder.mkdir()
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:04d}.tar", "w") as tar:
            for i, image in enumerate(_images(per_shard, s)):
                png = io.BytesIO()
                image.save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("cls", str(s * per_shard + i).encode())):
                    info = tarfile.TarInfo(f"{s:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def test_streams_an_image_folder_a_saved_dataset_and_webdataset_shards(tmp_path):
    import datasets

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(_images(12, 0)):
        image.save(folder / f"{i:02d}.png")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": _images(12, 1), "label": list(range(12))}, features=_features()).save_to_disk(
        str(saved)
    )
    wds = [
        "--dataset_name",
        str(_write_webdataset(tmp_path / "wds")),
        "--image_column",
        "png",
        "--label_column",
        "cls",
    ]
    for flags, has_labels in (
        (["--train_data_dir", str(folder)], False),
        (["--dataset_name", str(saved)], True),
        (wds, True),
    ):
        batch = next(StreamBatches(open_stream(_settings(*flags), 0, 1), 4, "cpu").epoch())
        assert batch["images"].shape == (4, 1, 8, 8) and -1 <= batch["images"].min() < batch["images"].max() <= 1
        assert ("labels" in batch) == has_labels


def test_a_position_reloaded_continues_with_the_same_batches_and_warns_when_the_order_changed(shards, caplog):
    argv = ["--dataset_name", str(shards), "--shuffle_buffer_size", "8", "--max_train_samples", "20"]
    settings = _settings(*argv)
    reference = StreamBatches(open_stream(settings, 0, 1), 8, "cpu")
    batches = [b["images"] for b in itertools.islice(reference.epoch(), 7)]  # 2 batches a pass: 3 passes and one
    first = StreamBatches(open_stream(settings, 0, 1), 8, "cpu")
    for _ in itertools.islice(first.epoch(), 3):
        pass
    assert first.state_dict()["stream_epoch"] == 1 and first.state_dict()["position"] == 8
    resumed = StreamBatches(open_stream(settings, 0, 1), 8, "cpu")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    assert all(torch.equal(a, b["images"]) for a, b in zip(batches[3:], itertools.islice(resumed.epoch(), 4)))
    other = StreamBatches(open_stream(_settings(*argv, "--shuffle_buffer_size", "4"), 0, 1), 8, "cpu")
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        other.load_state_dict(first.state_dict())
    assert "shuffle_buffer_size was 8 in the checkpoint and is 4 now" in caplog.text and "not exact" in caplog.text


def test_a_broken_record_is_named_or_skipped(tmp_path, tiny_config):
    broken = _write_parquet_shards(tmp_path / "broken", broken_label=5)
    settings = _settings("--dataset_name", str(broken), "--shuffle_buffer_size", "1")
    with pytest.raises(tu.TrainingError, match=r"stream epoch 0, record \d+\) \(broken\.png\).*--skip_broken"):
        for _ in StreamBatches(open_stream(settings, 0, 1), 8, "cpu").epoch():
            pass
    argv = ["--streaming", "--dataset_name", broken, "--num_channels", 1, "--max_train_steps", 9]
    with pytest.raises(tu.TrainingError, match=r"broken\.png"):
        tu.main(tiny_args(tiny_config, tmp_path / "run", *argv))
    result = tu.main(tiny_args(tiny_config, tmp_path / "run", *argv, "--skip_broken_images", "--overwrite_output_dir"))
    assert result["global_step"] == 9  # 64 records, 8 a batch: update 9 is in the second pass


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--streaming", "--dataset_name", "x"], "--max_train_steps"),
        (["--streaming", "--max_train_steps", "3"], "--streaming needs --dataset_name"),
        (
            ["--streaming", "--dataset_name", "x", "--max_train_steps", "3", "--data_loading", "cache"],
            "--data_loading",
        ),
    ],
)
def test_bad_streaming_flags_are_cli_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        tu.parse_args(argv)
    assert flag in capsys.readouterr().err
