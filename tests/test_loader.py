"""The training loader: pairing, every sample once per epoch, invariance of the global batch to processes and
workers, resume, per-epoch seeds, and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import to_tensor

import clip_dro.data.train_loader as train_loader
from clip_dro.data.train_loader import TrainLoader
from clip_dro.errors import UserError
from data_prep.tabular import prep_table
from datagen import captions_table, id_of_tensor, id_tokenizer, read_dataset

NUM_IMAGES = 48  # 12 shards of 4


def noisy(image):
    """A preprocess with randomness (torch's global RNG), small enough to keep the colour id readable."""
    return to_tensor(image) + 0.005 * torch.randn(3, 1, 1)


@pytest.fixture(scope="module")
def data(module_tmp) -> Path:
    tmp = module_tmp("loader")
    csv, root = captions_table(tmp, NUM_IMAGES, lambda i: 1 + i % 3)
    prep_table(input=csv, output=tmp / "data", image_col="filepath", caption_col="title", image_root=root,
               shard_size=4, workers=1, shuffle=False)  # sample i shows image id i
    return tmp / "data"


def loader(data, batch_size, preprocess=noisy, **kw) -> TrainLoader:
    kw.setdefault("seed", 7)
    return TrainLoader(data, preprocess, id_tokenizer, batch_size, **kw)


def global_batches(data, epoch, world_size, batch_size, start_step=0, **kw):
    """Step by step, the rank batches of every rank concatenated in rank order."""
    ranks = [list(loader(data, batch_size, rank=r, world_size=world_size, **kw).epoch(epoch, start_step))
             for r in range(world_size)]
    return [{k: torch.cat([getattr(ranks[r][s], k) for r in range(world_size)])
             for k in ("images", "tokens", "image_index", "text_index")} for s in range(len(ranks[0]))]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_batches_keep_images_with_their_captions(data):
    texts = {t: (s["meta"]["image_index"], j) for s in read_dataset(data)
             for j, t in enumerate(s["meta"]["text_index"])}
    batches = list(loader(data, 8, lanes=2).epoch(0))
    assert len(batches) == 6
    for b in batches:
        assert b.images.dtype == torch.float32 and b.images.shape == (8, 3, 16, 24)
        assert b.image_index.dtype == torch.int64 == b.text_index.dtype and b.tokens.dtype == torch.long
        for k in range(8):
            image_id = id_of_tensor(b.images[k])
            assert image_id == int(b.image_index[k]) == int(b.tokens[k, 0])
            assert texts[int(b.text_index[k])] == (image_id, int(b.tokens[k, 1]))


def test_every_sample_once_per_epoch_across_processes_and_workers(data):
    batches = global_batches(data, 0, world_size=2, batch_size=4, workers=2, lanes=4)
    seen = torch.cat([b["image_index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(NUM_IMAGES))


def test_each_shard_read_by_one_rank(data, monkeypatch):
    reads: list[tuple[int, str]] = []
    real = train_loader.shard_samples

    def spy(location, *args, **kw):
        reads.append((rank, Path(location).name))
        return real(location, *args, **kw)

    monkeypatch.setattr(train_loader, "shard_samples", spy)
    for rank in (0, 1):
        list(loader(data, 4, rank=rank, world_size=2, lanes=4).epoch(0))
    shards = [name for _, name in reads]
    assert sorted(shards) == sorted(p.name for p in data.glob("*.tar")) and len(set(shards)) == 12


def test_global_batch_is_invariant_to_processes_and_workers(data):
    one = global_batches(data, 1, world_size=1, batch_size=8, workers=0, lanes=4)
    two = global_batches(data, 1, world_size=2, batch_size=4, workers=2, lanes=4)
    four = global_batches(data, 1, world_size=4, batch_size=2, workers=0, lanes=4)
    assert_same(one, two)
    assert_same(one, four)


def test_dataloader_workers_deliver_pieces_in_order(data):
    inline = global_batches(data, 0, world_size=1, batch_size=8, workers=0, lanes=4)
    workers = global_batches(data, 0, world_size=1, batch_size=8, workers=2, lanes=4)
    assert_same(inline, workers)
    # lanes 0-1 (worker 0) fill the first half of each batch: they read shards assigned to lanes 0 and 1
    ld = loader(data, 8, lanes=4)
    lanes01 = {shard for lane in (0, 1) for shard, _, _ in ld.lane_segments(0, lane)}
    first_half = torch.cat([b["image_index"][:4] for b in workers])
    assert {int(i) // 4 for i in first_half} == lanes01


def test_resume_gives_the_remaining_batches_without_decoding_the_rest(data):
    calls = []

    def counting(image):
        calls.append(1)
        return noisy(image)

    full = global_batches(data, 2, world_size=1, batch_size=8, lanes=2)
    resumed = global_batches(data, 2, world_size=1, batch_size=8, lanes=2, start_step=4, preprocess=counting)
    assert_same(full[4:], resumed)
    assert len(calls) == 2 * 8


def test_epochs_and_seeds_change_the_order_and_captions(data):
    def order(epoch, seed):
        batches = list(loader(data, 8, lanes=2, seed=seed).epoch(epoch))
        return torch.cat([b.image_index for b in batches]), torch.cat([b.text_index for b in batches])

    (i0, t0), (i1, t1), (i0b, t0b), (j0, _) = order(0, 7), order(1, 7), order(0, 7), order(0, 8)
    assert torch.equal(i0, i0b) and torch.equal(t0, t0b)
    assert not torch.equal(i0, i1) and not torch.equal(i0, j0)
    choice0 = dict(zip(i0.tolist(), t0.tolist()))
    choice1 = dict(zip(i1.tolist(), t1.tolist()))
    assert any(choice0[i] != choice1[i] for i in choice0 if i % 3)  # multi-caption samples draw anew


def test_steps_in_epoch_and_leftovers(tmp_path):
    csv, root = captions_table(tmp_path, 50, 1)
    prep_table(input=csv, output=tmp_path / "d", image_col="filepath", caption_col="title", image_root=root,
               shard_size=4, workers=1)  # 13 shards: 12 of 4 and one of 2
    for epoch in range(3):
        ld = loader(tmp_path / "d", 6, lanes=2)
        batches = list(ld.epoch(epoch))
        assert len(batches) == ld.steps_in_epoch(epoch) == 50 // 6
        seen = torch.cat([b.image_index for b in batches]).tolist()
        assert len(set(seen)) == len(seen) == 6 * len(batches)


def test_real_open_clip_transform_and_tokenizer(data):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from clip_dro.models import build_model

    bundle = build_model("tiny-vit")
    batch = next(iter(TrainLoader(data, bundle.preprocess_train, bundle.tokenizer, 4, seed=0, lanes=2).epoch(0)))
    assert batch.images.shape == (4, 3, 64, 64) and batch.tokens.shape == (4, 32)
    texts = {t: c for s in read_dataset(data) for t, c in zip(s["meta"]["text_index"], s["captions"])}
    for k in range(4):
        assert torch.equal(batch.tokens[k], bundle.tokenizer([texts[int(batch.text_index[k])]])[0])
        pixels = batch.images[k] * torch.tensor(OPENAI_DATASET_STD)[:, None, None] + \
            torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
        assert id_of_tensor(pixels) == int(batch.image_index[k])


def test_configuration_errors_name_the_option(data):
    with pytest.raises(UserError, match="data.lanes"):
        loader(data, 4, world_size=2, lanes=3)
    with pytest.raises(UserError, match="data.batch_size"):
        loader(data, 5, lanes=2)
    with pytest.raises(UserError, match="12 shards"):
        loader(data, 16, lanes=16)
    ld = loader(data, 4, lanes=2)
    ld.check_indices_fit(NUM_IMAGES, 96)
    with pytest.raises(UserError, match="48 images.*loss state holds 40 images"):
        ld.check_indices_fit(40, 96)


def test_index_outside_the_manifest_names_shard_and_key(data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in data.iterdir():
        (bad / p.name).symlink_to(p)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["num_texts"] = 5
    (bad / "manifest.json").unlink()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shard .*shard-\d+\.tar, sample key \d{9}: text_index \d+ is outside"):
        list(loader(bad, 8, lanes=2).epoch(0))


@pytest.mark.slow
def test_two_real_processes_match_one(data, tmp_path):
    script = Path(__file__).with_name("loader_rank.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(data), str(r), "2", "4", "4", "1", "3",
                               str(tmp_path / f"rank{r}.json")], env=env) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = global_batches(data, 3, world_size=1, batch_size=8, workers=0, lanes=4, preprocess=to_tensor)
    assert ranks[0]["steps_in_epoch"] == ranks[1]["steps_in_epoch"] == len(single)
    for s, batch in enumerate(single):
        r0, r1 = ranks[0]["steps"][s], ranks[1]["steps"][s]
        assert r0["image_index"] + r1["image_index"] == batch["image_index"].tolist()
        assert r0["text_index"] + r1["text_index"] == batch["text_index"].tolist()
        assert np.isclose(r0["image_sum"] + r1["image_sum"], batch["images"].sum().item(), rtol=1e-5)


# --- the lane schedule: every sample once per epoch, at any ratio of shards to lanes --------------------------

@pytest.mark.parametrize("sizes, lanes, per_lane", [
    ([4] * 12, 4, 3),  # shards divide evenly over the lanes: no shard is cut
    ([1000] * 3, 2, 256),  # fewer shards than a balanced deal needs: whole-shard lanes would drop 40 %
    ([10] * 8, 8, 3),  # as many lanes as shards
    ([1000, 3, 3, 3, 7], 4, 2),  # one shard holds nearly everything
    (list(np.random.default_rng(0).integers(0, 60, 37)), 8, 5),  # uneven, with empty shards
])
def test_plan_uses_every_sample_but_less_than_a_global_batch(sizes, lanes, per_lane):
    from clip_dro.data.lanes import plan_epoch

    total, global_batch = sum(sizes), lanes * per_lane
    for epoch in range(3):
        plan = plan_epoch(sizes, lanes, per_lane, seed=5, epoch=epoch)
        assert plan.steps == total // global_batch and total - plan.steps * global_batch < global_batch
        covered = {s: np.zeros(n, dtype=int) for s, n in enumerate(sizes)}
        readers = {s: 0 for s in range(len(sizes))}
        for lane in range(lanes):
            segments = plan.lane_segments(lane)
            assert sum(hi - lo for _, lo, hi in segments) == plan.lane_length(lane) >= plan.steps * per_lane
            for shard, lo, hi in segments:
                covered[shard][lo:hi] += 1
                readers[shard] += 1
        assert all((c == 1).all() for c in covered.values())  # each position in exactly one lane
        cut = [s for s, n in readers.items() if n > 1]
        assert len(cut) <= lanes - 1
        if len(set(sizes)) == 1 and len(sizes) % lanes == 0 and total % global_batch == 0:
            assert not cut


def test_plan_is_linear_in_shards():
    """400 k shards x 512 lanes: one permutation, one cumulative sum, a binary search per lane."""
    from clip_dro.data.lanes import plan_epoch

    sizes = np.full(400_000, 1000)
    sizes[::7] = 997
    plan = plan_epoch(sizes, 512, 4, seed=0, epoch=3)
    assert plan.steps == int(sizes.sum()) // 2048
    assert sum(plan.lane_length(lane) for lane in range(512)) == sizes.sum()
    assert len(plan.lane_segments(511)) in range(780, 790)


@pytest.fixture(scope="module")
def uneven(module_tmp) -> Path:
    """50 samples in 13 shards (12 of 4, one of 2): lanes get unequal numbers of whole shards."""
    tmp = module_tmp("uneven")
    csv, root = captions_table(tmp, 50, lambda i: 1 + i % 2)
    prep_table(input=csv, output=tmp / "d", image_col="filepath", caption_col="title", image_root=root,
               shard_size=4, workers=1, shuffle=False)
    return tmp / "d"


@pytest.mark.parametrize("world_size, batch_size, lanes, workers", [(1, 6, 2, 1), (2, 4, 8, 2), (2, 6, 4, 1),
                                                                      (1, 12, 3, 2)])
def test_every_sample_once_per_epoch_at_any_ratio(uneven, world_size, batch_size, lanes, workers):
    global_batch = world_size * batch_size
    for epoch in (0, 1):
        batches = global_batches(uneven, epoch, world_size=world_size, batch_size=batch_size, lanes=lanes,
                                 workers=workers, preprocess=to_tensor)
        seen = torch.cat([b["image_index"] for b in batches]).tolist()
        assert len(batches) == 50 // global_batch
        assert len(set(seen)) == len(seen) and 50 - len(seen) < global_batch
        for b in batches:  # pairing survives the cut shards
            assert [id_of_tensor(x) for x in b["images"]] == b["image_index"].tolist() == b["tokens"][:, 0].tolist()


def test_global_batch_invariant_and_resume_exact_with_cut_shards(uneven):
    """Global batch 10 over 2 lanes: each lane needs 25 samples, so a lane cut falls inside a shard, whose two
    parts two workers (or two processes) read."""
    kw = dict(lanes=2, shuffle_buffer=5)
    plan = loader(uneven, 10, **kw).plan(2)
    lane_shards = [{s for s, _, _ in plan.lane_segments(lane)} for lane in range(2)]
    assert lane_shards[0] & lane_shards[1]  # a cut shard
    one = global_batches(uneven, 2, world_size=1, batch_size=10, workers=0, **kw)
    workers = global_batches(uneven, 2, world_size=1, batch_size=10, workers=2, **kw)
    two = global_batches(uneven, 2, world_size=2, batch_size=5, workers=1, **kw)
    assert_same(one, workers)
    assert_same(one, two)
    seen = torch.cat([b["image_index"] for b in one]).tolist()
    assert len(one) == 5 and len(set(seen)) == 50
    resumed = global_batches(uneven, 2, world_size=2, batch_size=5, workers=1, start_step=2, **kw)
    assert_same(one[2:], resumed)


def test_shuffle_buffer_mixes_lanes_deterministically(uneven):
    def lane_order(buffer, seed=7):
        ld = loader(uneven, 4, lanes=2, shuffle_buffer=buffer, seed=seed, preprocess=to_tensor)
        return [b.image_index[:2].tolist() for b in ld.epoch(0)], ld

    sequential, ld = lane_order(0)
    # buffer 0: lane 0 reads its shards' samples in file order (shuffle=False prep: index = position)
    expected = [ld.manifest.shards[s].first_index + p for s, lo, hi in ld.lane_segments(0, 0) for p in range(lo, hi)]
    assert [i for pair in sequential for i in pair] == expected[:2 * len(sequential)]
    mixed, _ = lane_order(8)
    again, _ = lane_order(8)
    assert mixed == again and mixed != sequential
    assert sorted(i for pair in mixed for i in pair) != [i for pair in mixed for i in pair]
    with pytest.raises(UserError, match="data.shuffle_buffer"):
        loader(uneven, 4, lanes=2, shuffle_buffer=-1)


def test_one_reader_parses_captions_for_training_evaluation_and_tests(tmp_path):
    """CRLF line ends and a final newline: every reader sees the same two captions."""
    from clip_dro.data.eval_sets import check_retrieval_set
    from datagen import image_bytes
    from evalgen import write_shards

    samples = [{"jpg": image_bytes(i), "txt": f"item {i} caption 0\r\nitem {i} caption 1\n",
                "json": {"index": i, "image_index": i, "text_index": [2 * i, 2 * i + 1]}} for i in range(4)]
    write_shards(tmp_path / "crlf", samples, 2, "retrieval", num_texts=8)
    want = [[f"item {i} caption 0", f"item {i} caption 1"] for i in range(4)]
    assert check_retrieval_set(tmp_path / "crlf").captions == want
    assert [s["captions"] for s in read_dataset(tmp_path / "crlf")] == want
    batches = list(loader(tmp_path / "crlf", 2, lanes=2, preprocess=to_tensor).epoch(0))
    tokens = torch.cat([b.tokens for b in batches]).tolist()
    indices = torch.cat([b.image_index for b in batches]).tolist()
    assert sorted(indices) == [0, 1, 2, 3] and all(t[0] == i and t[1] in (0, 1) for t, i in zip(tokens, indices))
