"""Projected 8-GPU data-parallel throughput of grassfx vs dense AdamW (a model, not a run).

Assumptions (stated so they can be argued with):
* data parallel over N = 8 GPUs, ring all-reduce: time = 2 (N-1)/N * bytes / link bandwidth;
* gradients communicated in bf16 (2 bytes per element);
* compute = 6 * params * tokens / (peak * MFU); H100 bf16 dense peak 989 TFLOP/s, MFU 0.40;
  grassfx shrinks the weight-gradient third of every projected GEMM to r/m, so its
  compute is (2 + r/m) / 3 of the dense linear-layer compute (attention/other FLOPs are
  ignored on both sides);
* grassfx sends r * min(m, n) elements per projected weight (selection along the larger
  dim, proj_dim="auto"), the full gradient of unprojected parameters (embeddings, norms),
  plus a dense all-reduce of projected weights once per update_freq (200) steps;
* two bounds on overlap: none (step = compute + comm) and perfect (step = max).
LLaMA shapes as in the GaLore/Grass papers: 1B (d 2048, ffn 5461, 24 layers), 7B
(d 4096, ffn 11008, 32 layers), vocabulary 32000, untied LM head (projected).

Example:
    python benchmarks/projection.py
"""

from __future__ import annotations

CONFIGS = {"LLaMA-1B": (2048, 5461, 24, 512), "LLaMA-7B": (4096, 11008, 32, 1024)}
LINKS = {"100 Gb/s": 12.5e9, "NVLink-class (450 GB/s)": 450e9}
N, PEAK, MFU, VOCAB, TOKENS_PER_GPU, UPDATE_FREQ, BYTES = 8, 989e12, 0.40, 32000, 16384, 200, 2


def shapes(d, ffn, layers):
    per_layer = [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)]
    return per_layer * layers + [(VOCAB, d)]  # + LM head; the embedding is not projected


def project(name, d, ffn, layers, rank):
    weights = shapes(d, ffn, layers)
    proj_params = sum(m * n for m, n in weights)
    dense_other = VOCAB * d + (2 * layers + 1) * d  # embedding + norms
    params = proj_params + dense_other
    kept = sum(min(rank, max(m, n)) * min(m, n) for m, n in weights)
    ratio = kept / proj_params  # r/m averaged by size
    dense_bytes = params * BYTES
    grass_bytes = (kept + dense_other) * BYTES + proj_params * BYTES / UPDATE_FREQ
    compute = 6 * params * TOKENS_PER_GPU / (PEAK * MFU)
    grass_compute = compute * (dense_other + proj_params * (2 + ratio) / 3) / params
    rows = []
    for link, bw in LINKS.items():
        comm = lambda b: 2 * (N - 1) / N * b / bw  # noqa: E731
        no_overlap = (compute + comm(dense_bytes)) / (grass_compute + comm(grass_bytes))
        overlap = max(compute, comm(dense_bytes)) / max(grass_compute, comm(grass_bytes))
        rows.append((link, comm(dense_bytes), comm(grass_bytes), no_overlap, overlap))
    return params, ratio, dense_bytes, grass_bytes, compute, grass_compute, rows


def main():
    print("| model | rank | params | r/m (by size) | all-reduce bytes dense -> grassfx | compute/step dense -> grassfx "
          "| link | comm dense -> grassfx | throughput ratio (no overlap / full overlap) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (d, ffn, layers, rank) in CONFIGS.items():
        params, ratio, db, gb, c, gc, rows = project(name, d, ffn, layers, rank)
        for link, cd, cg, no, ov in rows:
            print(f"| {name} | {rank} | {params / 1e9:.2f}B | {ratio:.3f} | {db / 2**30:.2f} GiB -> {gb / 2**30:.2f} GiB "
                  f"| {c * 1e3:.0f} ms -> {gc * 1e3:.0f} ms | {link} | {cd * 1e3:.0f} ms -> {cg * 1e3:.0f} ms "
                  f"| {no:.2f}x / {ov:.2f}x |")


if __name__ == "__main__":
    main()
