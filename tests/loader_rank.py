"""Helper for tests/test_loader.py: one process of a multi-process read; writes its rank batches as JSON.

usage: python loader_rank.py DATA_DIR RANK WORLD_SIZE BATCH LANES WORKERS EPOCH OUT
"""
import json
import sys

from torchvision.transforms.functional import to_tensor

from clip_dro.data.train_loader import TrainLoader
from datagen import id_tokenizer

if __name__ == "__main__":
    data, rank, world, batch, lanes, workers, epoch, out = sys.argv[1:]
    loader = TrainLoader(data, to_tensor, id_tokenizer, int(batch), seed=7, rank=int(rank), world_size=int(world),
                         workers=int(workers), lanes=int(lanes))
    steps = [{"image_index": b.image_index.tolist(), "text_index": b.text_index.tolist(),
              "image_sum": b.images.sum().item()} for b in loader.epoch(int(epoch))]
    with open(out, "w") as f:
        json.dump({"steps": steps, "steps_in_epoch": loader.steps_in_epoch(int(epoch))}, f)
