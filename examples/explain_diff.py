"""What grassfx rewrote: ``grassfx.explain`` (a table per weight) and ``grassfx.diff`` (each pass's graph diff).

    python examples/explain_diff.py            # Inductor
    python examples/explain_diff.py --tiny     # aot_eager: the same rewritten graphs, no Inductor (seconds)
    python examples/explain_diff.py --html diff.html   # also a side-by-side HTML page
"""

import argparse
import os

import torch
from torch import nn

import grassfx


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("GRASSFX_EXAMPLE_TINY") == "1")
    parser.add_argument("--html", default=None, help="write the diff as a side-by-side HTML page")
    args = parser.parse_args()
    backend = "aot_eager" if args.tiny else "inductor"

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(100, 32), Block(32), Block(32), nn.Linear(32, 100))
    tokens = torch.randint(0, 100, (4, 16))

    # explain: compiles one training step of a copy of the model and reports each weight.
    model = grassfx.compile(net, rank=8, backend=backend)
    report = grassfx.explain(model, tokens)
    print(report)

    # diff: a model compiled with record=True keeps each pass's before/after graphs.
    model = grassfx.compile(grassfx.unwrap(model), rank=8, backend=backend, record=True)
    for _ in range(2):  # a refresh step, then a normal step (the rewritten graph)
        model(tokens).logsumexp(-1).mean().backward()
    diff = grassfx.diff(model)
    lines = str(diff).splitlines()
    counts = next((i for i, line in enumerate(lines) if line.startswith("op counts")), len(lines))
    print("\n".join(lines[:min(40, counts)]))  # the start of the first graph's diff ...
    if counts > 40:
        print(f"... ({counts - 40} more lines; --html writes them all)")
    print("\n".join(lines[counts:]))  # ... and what each pass did to the op counts
    if args.html:
        diff.to_html(args.html)
        print("wrote", args.html)


if __name__ == "__main__":
    main()
