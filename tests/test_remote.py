"""Prep directories and shards read from URLs: http(s):// (a local server on 127.0.0.1), pipe: commands and
fsspec URLs; the same batches as from the local directory, exact resume without fetching the skipped shards,
remote evaluation sets, prep wds from URLs, and one-line errors naming the URL."""
from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import to_tensor

from clip_dro.data.eval_sets import check_retrieval_set, image_batches, iter_sample_json, load_zeroshot_set
from clip_dro.data.train_loader import TrainLoader
from clip_dro.errors import UserError
from clip_dro.manifest import LocationError, load_manifest, open_location
from data_prep.reshard import prep_wds
from data_prep.tabular import prep_table
from datagen import caption, captions_table, id_tokenizer, image_bytes, write_wds_input
from evalgen import make_retrieval_set, make_zeroshot_shards
from test_loader import assert_same, global_batches


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def www(module_tmp):
    """(served directory, its URL): an HTTP server on 127.0.0.1 in a thread of this process."""
    root = module_tmp("www")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def data(www) -> Path:
    """A prep directory of 48 samples in 12 shards, also served at <url>/train."""
    root, _ = www
    csv, images = captions_table(root.parent / "src", 48, lambda i: 1 + i % 3)
    prep_table(input=csv, output=root / "train", image_col="filepath", caption_col="title", image_root=images,
               shard_size=4, workers=1)
    return root / "train"


def batches(location, epoch=1, start_step=0, world_size=1, batch_size=8, workers=0, **kw):
    """The global batches (ranks concatenated) of an epoch from ``location``."""
    return global_batches(location, epoch, world_size, batch_size, start_step, seed=3, workers=workers, lanes=4,
                          shuffle_buffer=6, preprocess=to_tensor, **kw)


def test_http_directory_gives_the_local_batches_and_resumes_exactly(www, data):
    _, url = www
    assert load_manifest(f"{url}/train").to_dict() == load_manifest(data).to_dict()
    local = batches(data)
    assert_same(local, batches(f"{url}/train", world_size=2, batch_size=4, workers=1))
    # resume at step 4 of 6: the same remaining batches, and the shards read only by the skipped steps are
    # never requested (lane blocks of 6 = the first 1.5 steps of a lane, so resuming at 4 skips whole shards)
    _Handler.requests.clear()
    resumed = batches(f"{url}/train/", start_step=4, workers=1)
    assert_same(local[4:], resumed)
    loader = TrainLoader(data, to_tensor, id_tokenizer, 8, seed=3, lanes=4, shuffle_buffer=6)
    needed = set()
    for lane in range(4):
        item = 0
        for shard, lo, hi in loader.lane_segments(1, lane):
            if item + hi - lo > 6:  # the lane's shuffle block holding step 4 starts at item 6
                needed.add(loader.manifest.shards[shard].name)
            item += hi - lo
    fetched = {p.rsplit("/", 1)[-1] for p in _Handler.requests if p.endswith(".tar")}
    assert fetched == needed and len(fetched) < 12


def test_pipe_command_gives_the_local_batches(data):
    location = f"pipe:cat {data}/{{name}}"
    local = batches(data)
    assert_same(local, batches(location, workers=2))
    assert_same(local[3:], batches(location, start_step=3, world_size=2, batch_size=4, workers=1))


def test_fsspec_url_gives_the_local_batches(data):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in data.iterdir():
        memory.pipe(f"/remote-train/{path.name}", path.read_bytes())
    assert_same(batches(data), batches("memory://remote-train"))


def test_remote_evaluation_sets(www, tmp_path):
    root, url = www
    captions = make_retrieval_set(root / "ret", num_images=7, shard_size=3)
    labels = make_zeroshot_shards(root / "zs", ["cat", "dog"], per_class=3, templates=["a {c}."])
    info = check_retrieval_set(f"{url}/ret")
    assert info.name == "ret" and info.captions == captions
    assert info.images[0].where == f"{url}/ret/shard-00000.tar: sample 000000000"
    local = check_retrieval_set(root / "ret")
    remote_images = torch.cat([b.images for b in image_batches(info.images, to_tensor, 4)])
    assert torch.equal(remote_images, torch.cat([b.images for b in image_batches(local.images, to_tensor, 4)]))
    zs = load_zeroshot_set(f"pipe:cat {root / 'zs'}/{{name}}")
    assert (zs.name, zs.classnames, zs.labels, [t("x") for t in zs.templates]) == ("zs", ["cat", "dog"], labels,
                                                                                   ["a x."])
    assert list(iter_sample_json(f"{url}/ret")) == list(iter_sample_json(root / "ret"))


def _input_shards(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(3):
        write_wds_input(directory / f"{shard:05d}.tar", [
            {"__key__": f"{shard}{i:04d}", "jpg": image_bytes(10 * shard + i),
             "txt": caption(10 * shard + i, 0).encode()}
            for i in range(5)])


def test_prep_wds_reads_urls_and_pipes(www, tmp_path):
    root, url = www
    _input_shards(root / "cc")
    prep_wds(input=str(root / "cc" / "{00000..00002}.tar"), output=tmp_path / "local", shard_size=4, workers=1)
    prep_wds(input=f"{url}/cc/{{00000..00002}}.tar", output=tmp_path / "http", shard_size=4, workers=1)
    prep_wds(input=f"pipe:cat {root / 'cc'}/{{00000..00002}}.tar", output=tmp_path / "pipe", shard_size=4,
             workers=2)
    names = [s.name for s in load_manifest(tmp_path / "local").shards]
    assert len(names) == 4
    for other in ("http", "pipe"):
        assert load_manifest(tmp_path / other).num_samples == 15
        for name in names:
            assert (tmp_path / other / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), (other, name)


def test_remote_failures_are_one_line_errors_naming_the_url(www, data, tmp_path):
    root, url = www
    with pytest.raises(UserError, match=rf"{url}/nowhere is not a prep output directory: cannot read "
                                        rf"{url}/nowhere/manifest.json \(HTTP 404"):
        load_manifest(f"{url}/nowhere")
    with pytest.raises(UserError, match=r"not a prep output directory: cannot read pipe:cat /nowhere/manifest.json: "
                                        r"the command exited with status 1 \(cat: /nowhere/manifest.json"):
        load_manifest("pipe:cat /nowhere/{name}")
    with pytest.raises(UserError, match=r"must name its files with \{name\}"):
        load_manifest(f"pipe:cat {data}/manifest.json")
    broken = root / "broken"
    shutil.copytree(data, broken)
    (broken / "shard-000003.tar").unlink()
    with pytest.raises(UserError, match=rf"shard {url}/broken/shard-000003.tar: cannot read .*HTTP 404"):
        batches(f"{url}/broken", workers=1)
    with pytest.raises(LocationError, match="cannot read"):
        open_location("nosuchscheme://x/y").read()
