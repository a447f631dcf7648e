"""Text -> portrait: CLIP text embedding, optional modality-gap correction, Stage-2 EMA generator.

At inference the text embedding r_t takes the place of the image embedding r_x that Stage 2 was
trained on (paper sec. 2): w_r(alpha) = w + alpha T_G(w, r_t) (eq. 11), then Stage 1's synthesis
with the mesh of the requested morphable parameters and the requested camera. Latencies are
measured per call (``LatencyMeter``: the host clock on CPUs, CUDA events on GPUs) and reported per
prompt (text encoding) and per image (generation); a call that runs inputs of a new signature (batch
size, dtypes, autocast) is reported apart, as ``<stage>_first_call``: it holds the graph capture and
its warm-up runs, or torch.compile's compilation, which later calls of that signature do not pay.

The engine freezes the generator's weights (``nn.layers.freeze_weights``): the folded up-sampling
kernels, casts and demodulation sums are computed once, not per call; on CUDA it keeps a bf16 copy of
the text tower for bf16 autocast. So an engine serves the weights it was built with.

With ``cuda_graphs`` (on CUDA) the text tower and the generator each run as a CUDA graph captured
once per batch size (``utils.cuda_graphs``), or both as one (``portraits``: prompt i -> portrait i):
the same kernels, launched by one call instead of several hundred, which is what bounds a small
batch. On CUDA the render's geometry (meshes, rays, the deformation's grid and the coarse pass's
points, ``Stage1GAN.prepare_rays``) is queued on a second stream, so it runs beside the text tower,
mapping and tri-plane synthesis. Host inputs (tokens, latents, conditioning) are
copied without blocking the host, and every replay's inputs are checked for non-finite values (the
checks inside the graphs cannot run there).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from ..nn.layers import freeze_weights
from ..utils.cuda_graphs import GraphCaptureError, GraphedFunction, check_finite
from .modality_gap import ModalityGap

log = logging.getLogger(__name__)
COND_KEYS = ("camera", "shape", "expression", "pose", "flip")
OUTPUT_KEYS = ("image", "image_raw", "image_depth", "image_alpha")  # what render returns (and a replay copies)


@dataclass
class LatencyMeter:
    """Accumulated time (ms) and item counts per named stage: the host clock on CPUs; on CUDA, events
    recorded on the stream around the stage (from when the GPU is free for it to when its work is
    done, host time while the GPU waits included), read when the totals are asked for, so measuring
    adds no synchronisation to the calls. The measured block may rename its stage (``call["name"]``)
    when it learns what it was, e.g. a first call."""

    totals_ms: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    _pending: list = field(default_factory=list)

    @contextmanager
    def measure(self, name: str, items: int, device: torch.device) -> Iterator[dict]:
        call = {"name": name}
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield call
            end.record()
            self._pending.append((call["name"], start, end))
            elapsed = 0.0
        else:
            begin = time.perf_counter()
            yield call
            elapsed = (time.perf_counter() - begin) * 1e3
        self.totals_ms[call["name"]] = self.totals_ms.get(call["name"], 0.0) + elapsed
        self.items[call["name"]] = self.items.get(call["name"], 0) + int(items)

    def per_item_ms(self) -> dict[str, float]:
        for name, start, end in self._pending:
            end.synchronize()
            self.totals_ms[name] += start.elapsed_time(end)
        self._pending.clear()
        return {name: self.totals_ms[name] / max(self.items[name], 1) for name in self.totals_ms}


def check_rows(count: int, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError naming every tensor whose leading dimension is not ``count`` (one row per seed):
    caught here, a wrong count would fail deep inside the render, naming none of the inputs."""
    wrong = [f"{name}: {len(x) if x.ndim else 'no'} rows" for name, x in tensors.items() if not x.ndim or len(x) != count]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} for {count} seeds; expected one row per seed")


def latent(seed: int, z_dim: int) -> torch.Tensor:
    """z (z_dim,) of a seed, drawn on the CPU so a seed gives the same portrait on every device."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed)))


class TextToPortrait:
    """A Stage-2 system (its EMA generator) driven by a CLIP text encoder; see the module docstring."""

    def __init__(self, system, clip, gap: ModalityGap | None = None, truncation_psi: float = 1.0,
                 cuda_graphs: bool = False) -> None:
        width = int(system.cfg.alignment.embed_dim)
        if clip.embed_dim != width:
            raise UserError(f"lvlm {clip.model_id} embeds text in {clip.embed_dim} dimensions, but the checkpoint's "
                            f"alignment network T_G takes {width}-d embeddings: use the LVLM the checkpoint's "
                            "canonicalisation cache was made with (lvlm=...)")
        self.system = system
        device = next(system.G_ema.parameters()).device
        dtypes = (next(system.G_ema.parameters()).dtype,) + ((torch.bfloat16,) if device.type == "cuda" else ())
        freeze_weights(system.G_ema, dtypes)
        self.clip = clip
        # Where generator and text tower run, looked up once: an engine serves the model it was built with
        # (and a parameter walk per call is measurable host time at batch 1).
        self._device, self._text_device = device, clip.device
        # bf16 autocast on CUDA: the text tower runs on a bf16 copy (autocast would cast every weight per call)
        self._text_bf16 = clip.text_copy(torch.bfloat16) if clip.device.type == "cuda" else None
        self.latency = LatencyMeter()
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_failure: str | None = None  # why capturing failed (the engine then runs eagerly)
        self._seen: set[tuple] = set()  # (graph name, input signature) of every eager call so far
        self._cold = False  # whether the call being measured ran a signature for the first time
        self._graphs = {"text": GraphedFunction(self._embed_tokens, device=clip.device, check_finite=True),
                        "portrait": GraphedFunction(self._portrait, device=device, check_finite=True),
                        "prompt_portrait": GraphedFunction(self._prompt_portrait, device=device, check_finite=True)}
        self.gap, self.truncation_psi = gap, truncation_psi
        # The render's geometry (meshes, rays, deformation grid, coarse points) runs on this stream beside
        # the text tower, mapping and synthesis, which leave a small batch's GPU mostly idle.
        self._geometry_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def truncation_psi(self) -> float:
        return self._truncation_psi

    @truncation_psi.setter
    def truncation_psi(self, psi: float) -> None:
        # A captured graph holds the value it was captured with: a change captures again.
        self._truncation_psi = float(psi)
        self._drop_graphs()

    @property
    def gap(self) -> ModalityGap | None:
        """The modality-gap correction applied to every text embedding (None: none)."""
        return self._gap

    @gap.setter
    def gap(self, gap: ModalityGap | None) -> None:
        self._gap = gap.to(self._text_device) if gap is not None else None
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        for graphed in self._graphs.values():
            graphed.clear()
        self._seen.clear()  # the next call of each signature is a first call again (capture, warm-up)

    def graphs_used(self) -> bool:
        """Whether any call so far was replayed from a CUDA graph."""
        return any(len(g) for g in self._graphs.values())

    def _run(self, name: str, inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """``_embed_tokens`` / ``_portrait`` of ``inputs`` (on the host or on ``device``): replayed from a
        CUDA graph when enabled and on CUDA, else called; a capture that fails is logged once and the
        engine goes on eagerly."""
        graphed = self._graphs[name]
        if self.cuda_graphs and self.graph_failure is None and device.type == "cuda":
            try:
                out = graphed(*inputs.values(), names=tuple(inputs))
                self._cold |= graphed.last_captured  # a new signature, or one captured again after its eviction
                return out
            except GraphCaptureError as exc:
                self.graph_failure = str(exc)
                log.warning("CUDA graphs off for this run: %s", exc)
        signature = (name, GraphedFunction.signature(tuple(inputs.values()), device))  # eager: compiled per signature
        self._cold |= signature not in self._seen
        self._seen.add(signature)
        check_finite(inputs)
        return graphed.fn(*(x.to(device) for x in inputs.values()))

    def _embed_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = tokens.device.type
        if self._text_bf16 is not None and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
            with torch.autocast(kind, enabled=False):
                embeddings = self.clip.encode_tokens(tokens, model=self._text_bf16)
        else:
            embeddings = self.clip.encode_tokens(tokens)
        return {"embedding": self.gap.apply(embeddings) if self.gap is not None else embeddings}

    def _portrait(self, z: torch.Tensor, camera: torch.Tensor, shape: torch.Tensor, expression: torch.Tensor,
                  pose: torch.Tensor, flip: torch.Tensor, alpha: torch.Tensor,
                  embedding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cond, rays = self._geometry(camera, shape, expression, pose, flip)
        return self._generate(z, cond, rays, alpha, embedding)  # (no embedding: alpha is 0, checked by ``render``)

    def _prompt_portrait(self, tokens: torch.Tensor, z: torch.Tensor, camera: torch.Tensor, shape: torch.Tensor,
                         expression: torch.Tensor, pose: torch.Tensor, flip: torch.Tensor,
                         alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        cond, rays = self._geometry(camera, shape, expression, pose, flip)  # queued before the text tower
        embedding = self._embed_tokens(tokens)["embedding"]
        return {"embedding": embedding, **self._generate(z, cond, rays, alpha, embedding)}

    def _geometry(self, camera, shape, expression, pose, flip):
        """The conditioning and its ``PreparedRays``, queued on the geometry stream (on CUDA) so they run
        beside what the caller queues next."""
        cond = {"camera": camera, "shape": shape, "expression": expression, "pose": pose, "flip": flip}
        return cond, self.system.prepare_rays(cond, self.system.G_ema, self._geometry_stream)

    def _generate(self, z, cond, rays, alpha, embedding) -> dict[str, torch.Tensor]:
        if embedding is not None:
            cond = {**cond, "clip_embedding": embedding, "alpha": alpha}
        out = self.system.generate(z, cond, G=self.system.G_ema, noise_mode="const",
                                   truncation_psi=self.truncation_psi, rays=rays)
        return {k: out[k] for k in OUTPUT_KEYS}

    @contextmanager
    def _measure(self, name: str, items: int, device: torch.device) -> Iterator[None]:
        """``latency.measure`` of the block as ``name``, or as ``<name>_first_call`` when it ran a new
        signature: capture, warm-up and compilation are not the steady-state latency."""
        self._cold = False
        with self.latency.measure(name, items, device) as call:
            yield
            if self._cold:
                call["name"] = f"{name}_first_call"

    @property
    def device(self) -> torch.device:
        """The generator's device (where the engine was built)."""
        return self._device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P,D) embeddings fed to T_G: E_T(prompt), corrected by the modality gap when one is set."""
        prompts = list(prompts)
        with self._measure("text_encoding", len(prompts), self._text_device):
            chunks = [self._run("text", {"tokens": self.clip.tokenize(prompts[i:i + self.clip.batch_size])},
                                self._text_device)["embedding"] for i in range(0, len(prompts), self.clip.batch_size)]
        return torch.cat(chunks).to(self.device)

    @torch.no_grad()
    def render(self, seeds: Sequence[int], cond: dict[str, torch.Tensor], embedding: torch.Tensor | None,
               alpha: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Portraits for ``seeds`` (B) under ``cond`` (camera + morphable parameters, B rows) and text
        ``embedding`` ((B,D), or None with alpha 0: the unconditional Stage-1 portrait): ``OUTPUT_KEYS``."""
        inputs = self._inputs(seeds, cond, alpha, with_text=embedding is not None)
        if embedding is not None:
            check_rows(len(seeds), {"embedding": embedding})
            inputs["embedding"] = embedding
        with self._measure("generation", len(seeds), self._device):
            return self._run("portrait", inputs, self._device)

    @torch.no_grad()
    def portraits(self, prompts: Sequence[str], seeds: Sequence[int], cond: dict[str, torch.Tensor],
                  alpha: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompt i -> the portrait of seed i under row i of ``cond``, in one call: text tower, T_G,
        synthesis and render run as one CUDA graph (with ``cuda_graphs``), the meshes and the
        deformation beside the text tower. ``OUTPUT_KEYS`` plus each prompt's ``embedding``. For many
        portraits of one prompt, ``encode`` it once and ``render``."""
        prompts = list(prompts)
        if len(prompts) != len(seeds):
            raise ValueError(f"portraits: {len(prompts)} prompts for {len(seeds)} seeds; expected one prompt per seed")
        if self._text_device != self._device:  # the text tower elsewhere: its own graph, then the portrait's
            embedding = self.encode(prompts)
            return {"embedding": embedding, **self.render(seeds, cond, embedding, alpha)}
        inputs = {"tokens": self.clip.tokenize(prompts), **self._inputs(seeds, cond, alpha, with_text=True)}
        with self._measure("text_to_portrait", len(seeds), self._device):
            return self._run("prompt_portrait", inputs, self._device)

    def _inputs(self, seeds: Sequence[int], cond: dict[str, torch.Tensor], alpha: float | torch.Tensor,
                with_text: bool) -> dict[str, torch.Tensor]:
        """The portrait inputs z, ``COND_KEYS`` and alpha (B,), where the caller has them (host or
        device; ``_run`` moves them)."""
        missing = [k for k in COND_KEYS if k not in cond]
        if missing:
            raise KeyError(f"conditioning: missing {missing} (have {sorted(cond)})")
        inputs = {"z": torch.stack([latent(s, self.system.cfg.backbone.z_dim) for s in seeds])}
        inputs.update({k: cond[k] for k in COND_KEYS})
        check_rows(len(seeds), {f"conditioning {k}": cond[k] for k in COND_KEYS})
        if not with_text:  # Stage 2's own check, here on the host (a graph cannot hold it)
            self.system.alpha_of({"alpha": alpha}, len(seeds), torch.device("cpu"))
        # alpha as a (B,) tensor: a graph replays any value; 0 without an embedding (Stage 1's portrait)
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
        if alpha.ndim and alpha.numel() != len(seeds):
            raise ValueError(f"alpha: {alpha.numel()} values for {len(seeds)} seeds; expected one number, or one per seed")
        inputs["alpha"] = alpha.expand(len(seeds)).contiguous() if alpha.ndim == 0 else alpha
        return inputs
