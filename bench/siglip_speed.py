"""transformers' SiglipModel of MedSigLIP-448's shape (random weights, f32, CPU) embedding
images and texts one at a time: the peer of `medbatch bench siglip` (bench/siglip_speed.sh
runs both in one go).

  python bench/siglip_speed.py [--runs 3] [--threads 2]

Needs torch and transformers (the fixture environment of tests/fixtures/siglip/make_fixture.py).
"""

import argparse
import resource
import statistics
import time

import torch
from transformers import SiglipConfig, SiglipModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shape = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=32000, max_position_embeddings=64, projection_size=1152, **shape),
        vision_config=dict(image_size=448, patch_size=14, **shape),
    )
    t = time.perf_counter()
    model = SiglipModel(cfg).eval()
    print(f"transformers SiglipModel of MedSigLIP-448's shape, f32, CPU, {a.threads} threads; made in {time.perf_counter() - t:.1f} s")
    pixels = torch.rand((1, 3, 448, 448)) * 2 - 1
    image_times, text_times = [], []
    with torch.inference_mode():
        for r in range(a.runs):
            t = time.perf_counter()
            model.get_image_features(pixel_values=pixels)
            image_times.append(time.perf_counter() - t)
            print(f"  image {r + 1}: {image_times[-1]:.2f} s")
        for r in range(a.runs * 4):
            ids = torch.tensor([[(i * 37 + r * 101) % 32000 for i in range(64)]])
            t = time.perf_counter()
            model.get_text_features(input_ids=ids)
            text_times.append(time.perf_counter() - t)
    i, x = statistics.median(image_times), statistics.median(text_times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"median {i:.2f} s per image ({1 / i:.3f} images/s), {x:.3f} s per text ({1 / x:.2f} texts/s); peak memory {peak:.0f} MiB")


if __name__ == "__main__":
    main()
