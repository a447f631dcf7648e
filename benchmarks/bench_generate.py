"""Text prompt -> 512^2 portrait: latency at batch 1 and throughput at batch 32 of the whole Stage-2
inference path (CLIP tokenizer + text tower, mapping, T_G of eq. 11, tri-plane synthesis, surface-field
deformation bound to the morphable mesh, volume rendering, super-resolution), as task=generate runs it.

    python -m benchmarks.bench_generate --device cuda        # eg3d_512 + deformation, ViT-B/32 text tower
    python -m benchmarks.bench_generate --small              # tiny sizes on CPU, checks the script

Random weights throughout (speed does not depend on them): the generator, T_G, and open_clip's ViT-B/32
built without pretrained weights (offline). Rows: the full path, and its two parts (text encoding alone;
generation from a given embedding) so a miss can be placed; on CUDA also the full path through
``generation.TextToPortrait`` replayed from CUDA graphs, seeds drawn and inputs copied and checked on
every call: ``cuda-graph`` rows call ``portraits`` (prompt -> portrait as one graph, the geometry on a
second stream), ``cuda-graphs encode+render`` rows encode, then render, as task=generate does (it
encodes each prompt once for all of its portraits). TF32 and bf16 autocast (the mapping MLP and volume compositing stay float32 by design;
synthesis/SR bf16 follow the backbone's flags).

Targets (DESIGN.md sec. 8, H100): <= 5 ms at batch 1, >= 800 portraits/s at batch 32; the paper reports
0.10 s per portrait; EG3D's generator alone takes 23.5 ms (batch 1) / 200.7 images/s (batch 32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks.bench_generator import precision_context
from benchmarks.harness import Timing, common_args, report, set_cuda_math, time_variant
from clipportrait.geometry.deformation import DeformationConfig
from clipportrait.geometry.cameras import sample_ffhq_like
from clipportrait.generation.pipeline import TextToPortrait
from clipportrait.lvlm.clip import ClipEncoder
from clipportrait.nn.alignment import AlignmentConfig
from clipportrait.nn.config import preset
from clipportrait.systems.stage2 import Stage2Config, Stage2GAN

TARGETS = {"b1_ms": 5.0, "b32_portraits_per_s": 800.0, "paper_s": 0.10, "eg3d_b1_ms": 23.5, "eg3d_b32_per_s": 200.7}
PROMPT_WORDS = ["red", "black", "blonde", "brown", "grey", "auburn", "blue", "green", "hazel", "dark"]


def prompts(count: int) -> list[str]:
    """``count`` different prompts in the synthetic captions' phrasing (tokenizer work varies a little)."""
    return [f"a photo of a person with long {PROMPT_WORDS[k % 10]} hair and {PROMPT_WORDS[(k // 10 + 6) % 10]} eyes"
            for k in range(count)]


def build_text_tower(arch: str, device: torch.device):
    """open_clip model of ``arch`` with random weights (no download) and its tokenizer."""
    import open_clip

    from clipportrait.lvlm.clip import quiet_open_clip
    from clipportrait.lvlm.models import register_project_models

    register_project_models()
    with quiet_open_clip():
        model = open_clip.create_model(arch, pretrained=None, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    return model.eval(), tokenizer


def build_system(small: bool, embed_dim: int, deform: bool, device: torch.device, compile_mode: str,
                 upconv_fir: str = "fold") -> Stage2GAN:
    name = "tiny" if small else "eg3d_512"
    # --small only checks the script: a coarser render keeps it to a few minutes on a busy CPU.
    overrides = {"neural_rendering_resolution": 16, "depth_samples": 8, "importance_samples": 8} if small else {}
    g, d = preset(name, compile=compile_mode, upconv_fir=upconv_fir, **overrides)
    cfg = Stage2Config(backbone=g, discriminator=d, deformation=DeformationConfig(enabled=deform),
                       alignment=AlignmentConfig(embed_dim=embed_dim))
    if small:
        cfg.morphable.target_faces_simplified = 300
    torch.manual_seed(0)
    system = Stage2GAN(cfg).to(device).eval()
    # T_G starts at zero; random output weights make the bench run the alignment arithmetic it would in use.
    with torch.no_grad():
        for p in system.G_ema.align.parameters():
            p.normal_(0.0, 0.02)
    return system


def main(argv: list[str] | None = None) -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None, help="open_clip text architecture (default ViT-B-32; --small: "
                        "clipportrait-tiny)")
    parser.add_argument("--no-deform", action="store_true", help="rigid generator (no surface-field deformation)")
    parser.add_argument("--psi", type=float, default=0.7, help="truncation psi")
    parser.add_argument("--precisions", default="tf32,bf16", help="comma-separated: tf32, bf16")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; --small: 1,2)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        set_cuda_math(tf32=True, autotune=True)
    arch = args.arch or ("clipportrait-tiny" if args.small else "ViT-B-32")
    clip, tokenizer = build_text_tower(arch, device)
    with torch.no_grad():
        embed_dim = int(clip.encode_text(tokenizer(["a"]).to(device)).shape[1])
    system = build_system(args.small, embed_dim, not args.no_deform, device, args.compile, args.upconv_fir)
    encoder = ClipEncoder(clip, tokenizer, arch, f"{arch}@random")
    G = system.G_ema
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ((1, 2) if args.small else (1, 32))
    name = "tiny" if args.small else "eg3d_512"
    results: list[Timing] = []

    def run(label: str, fn, batch: int, precision: str, extra: dict) -> None:
        time_variant(results, label, fn, batch=batch, dtype=precision, device=device, warmup=args.warmup,
                     runs=args.runs, extra=extra)

    for precision in args.precisions.split(","):
        for batch in batches:
            texts = prompts(batch)
            gen = torch.Generator().manual_seed(batch)
            params = system.geometry.morphable.sample_params(batch, generator=gen)
            cond = {"camera": sample_ffhq_like(batch, generator=gen).to(device), "shape": params.shape.to(device),
                    "expression": params.expression.to(device), "pose": params.pose.to(device),
                    "flip": torch.zeros(batch, dtype=torch.bool, device=device), "alpha": 1.0}
            z = torch.randn(batch, system.cfg.backbone.z_dim, generator=gen).to(device)
            with torch.no_grad():
                fixed_r = clip.encode_text(tokenizer(texts).to(device), normalize=True).float()

            def encode(texts=texts, precision=precision) -> torch.Tensor:
                with torch.inference_mode(), precision_context(precision, device):
                    tokens = tokenizer(texts).to(device, non_blocking=True)  # BPE runs on the host
                    return clip.encode_text(tokens, normalize=True).float()

            def portrait(r: torch.Tensor, z=z, cond=cond, precision=precision) -> torch.Tensor:
                with torch.inference_mode(), precision_context(precision, device):
                    return system.generate(z, {**cond, "clip_embedding": r}, G=G, noise_mode="const",
                                           truncation_psi=args.psi)["image"]

            extra = {"preset": name, "text_arch": arch, "deformation": not args.no_deform,
                     "deformation_faces": int(system.geometry.morphable.simplified_faces.shape[0]),
                     "resolution": system.cfg.backbone.img_resolution, "psi": args.psi,
                     "cuda_fast_path": system.cfg.backbone.cuda_fast_path,
                     "compile": system.cfg.backbone.compile, "upconv_fir": args.upconv_fir}
            run(f"text->portrait {precision}", lambda: portrait(encode()), batch, precision, {**extra, "part": "full"})
            run(f"  text encoding {precision}", encode, batch, precision, {**extra, "part": "text"})
            run(f"  generation from r {precision}", lambda: portrait(fixed_r), batch, precision,
                {**extra, "part": "generation"})
            if device.type == "cuda" and not args.no_graphs:
                engine = TextToPortrait(system, encoder, None, args.psi, cuda_graphs=True)
                cpu_cond = {k: v.cpu() for k, v in cond.items() if k != "alpha"}
                seeds = list(range(batch))

                def one_graph(texts=texts, engine=engine, cpu_cond=cpu_cond, seeds=seeds, precision=precision):
                    with torch.inference_mode(), precision_context(precision, device):
                        return engine.portraits(texts, seeds, cpu_cond, 1.0)["image"]

                def two_graphs(texts=texts, engine=engine, cpu_cond=cpu_cond, seeds=seeds, precision=precision):
                    with torch.inference_mode(), precision_context(precision, device):
                        return engine.render(seeds, cpu_cond, engine.encode(texts), 1.0)["image"]

                for label, fn, path in (("cuda-graph", one_graph, "TextToPortrait.portraits"),
                                        ("cuda-graphs encode+render", two_graphs, "TextToPortrait.encode+render")):
                    fn()  # captures (after eager warm-up calls, which compile what --compile compiles)
                    if engine.graph_failure or not engine.graphs_used():
                        print(f"no {label} row for batch {batch} {precision}: {engine.graph_failure}", file=sys.stderr)
                        break
                    run(f"text->portrait {precision} {label}", fn, batch, precision,
                        {**extra, "part": "full", "cuda_graphs": True, "path": path})

    out = args.out or Path(__file__).parent / "results" / f"bench_generate-{device.type}.json"
    report(results, title=f"text -> portrait ({name}, {arch} text tower, deformation "
                          f"{'off' if args.no_deform else 'on'}); targets {TARGETS}", device=device, out=out)


if __name__ == "__main__":
    main()
