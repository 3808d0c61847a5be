"""The torch-cuda engine: bf16 weights on one GPU, a preallocated KV cache, one CUDA graph per scale step.

Small scales are pure launch overhead when run eagerly (hundreds of kernel launches for a few thousand tokens),
so every scale's transformer step is captured once and replayed. Graphs need fixed addresses and shapes:
- the text features are copied into a static buffer, padded to a length bucket (one graph set per bucket), and the
  text conditioning is a graph too (~200 small kernels per prompt, host-bound eagerly: begin() plus scale 0 took
  ~7-10 ms against ~3.6 ms for scale 1 in e2e_h200.json); its outputs are the static inputs of the step graphs;
- the KV cache is preallocated for the whole schedule and written in place; graph sets with the same number of rows
  share one (5 GiB at 2B, 11 GiB at 8B for 1024² with CFG): one generation runs at a time, and a long-lived server
  otherwise allocates one per text bucket it meets;
- each scale reads its input codes from a static buffer and writes logits to a static output;
- CS4A state (selections, residual caches) is produced and consumed inside the graphs, at fixed addresses;
- for short prompts the text graph also folds each block's cross-attention projections into the text
  (sparvar.model.AbsorbedText), and every scale runs that form.
Sampling, CFG and code accumulation (a handful of small kernels per scale) run eagerly in the shared loop.
"""
from __future__ import annotations

import dataclasses

import torch

from .model import EAGER, Infinity, KVCache, TextCondition, absorption_pays, frozen_weight_functions, rope_tables
from .schedule import Schedule

# Text lengths are padded (masked) to a bucket, one graph set per bucket: a power of two from MIN_TEXT_BUCKET up to
# TEXT_BUCKET, then multiples of TEXT_BUCKET, so that few sets are needed. Short prompts get short buckets: the
# absorbed cross-attention's work grows with the padded length (10 buckets cover 1-512 tokens).
TEXT_BUCKET = 64
MIN_TEXT_BUCKET = 16


def text_bucket(length: int, maxlen: int) -> int:
    """The padded length of a text of `length` tokens (at most `maxlen`, the model's)."""
    if length <= TEXT_BUCKET:
        bucket = max(MIN_TEXT_BUCKET, 1 << (length - 1).bit_length())
    else:
        bucket = -(-length // TEXT_BUCKET) * TEXT_BUCKET
    return min(bucket, maxlen)


class _Graphs:
    """The captured graphs and static buffers for one (batch, guidance, text-length bucket)."""

    def __init__(self, features, lengths, text_graph, encode_text, text: TextCondition, cache, codes: list,
                 logits: list, graphs: list):
        self.features, self.lengths, self.text_graph, self.text = features, lengths, text_graph, text
        self.encode_text = encode_text  # what text_graph captured: the text of `features`, absorbed or not
        self.cache, self.codes, self.logits, self.graphs = cache, codes, logits, graphs


class CudaGraphRunner:
    def __init__(self, model: Infinity, schedule: Schedule, plan=None, use_graphs: bool = True, backend: str = "engine",
                 fuse_pointwise: bool = True, fp8_min_tokens: int | None = None, skip_last: int = 0,
                 absorb: bool = True):
        """skip_last: the generation loop skips the last scales; their graphs (the largest activations) are not
        captured, and asking for such a scale is an error. A SparVAR plan must be made for the same skip_last.
        absorb: run the cross-attention absorbed where the text bucket and batch make that cheaper (absorption_pays),
        at every scale: on the H100 it was as fast or faster at each scale of 2B and 8B, with 16- and 64-position
        texts (bench/results/cross_attention_h100_f3b2d39.json; on the H200 at 68664a3 two small scales were 7-9%
        slower with a 64-position text, cross_attention_h200_68664a3.json). With FP8 linears, absorb keeps the
        cross-attention out of FP8 in every graph set (with_fp8_linears(cross_attention=False)): absorbed, its
        projections do not run, and where a prompt or batch does not absorb they run in bf16, so an image's numbers
        do not depend on its prompt length or on what shares its batch."""
        self.run_scales = check_skip(schedule, plan, skip_last)
        self.absorb = absorb
        self.model, self.schedule, self.plan, self.use_graphs, self.backend = model, schedule, plan, use_graphs, backend
        self.device = model.pos_start.device
        if use_graphs and (not torch.cuda.is_available() or self.device.type != "cuda"):
            raise RuntimeError(f"CUDA graphs need the model on a CUDA GPU (model is on {self.device}, "
                               f"CUDA available: {torch.cuda.is_available()})")
        self.ropes = [r.to(self.device) for r in rope_tables(schedule, model.cfg.head_dim)]
        # eager, the element-wise glue is ~60 kernels per block: at small scales their count, at large scales their
        # memory traffic, costs more than the GEMMs (bench/results/profile_h100_unfused.json); torch.compile's
        # dynamic-shape kernels still cost as much as the GEMMs (profile_h200_compiled_glue.json). Five Triton kernels per block.
        if fuse_pointwise:
            from .kernels.pointwise import triton_block_ops

            self.ops = triton_block_ops()
        else:
            self.ops = EAGER
        if fp8_min_tokens is not None:  # FP8 linears at scales of at least this many tokens (sparvar/fp8.py)
            from .fp8 import with_fp8_linears

            quantizing = None
            if fuse_pointwise:  # the norms before the FP8 GEMMs write FP8 rows directly
                from .kernels.pointwise import triton_quantizing_norms

                quantizing = triton_quantizing_norms()
            self.ops = with_fp8_linears(self.ops, model, fp8_min_tokens, quantizing, cross_attention=not absorb)
        # an engine's weights are fixed
        self.ops = dataclasses.replace(self.ops, **frozen_weight_functions([blk.sa for blk in model.blocks]))
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.sets: dict[tuple[int, bool, int], _Graphs] = {}
        self.caches: dict[int, KVCache] = {}  # rows -> the KV cache of every graph set with that many rows
        self.current: _Graphs | None = None

    @torch.no_grad()
    def begin(self, features, lengths, guided: bool):
        B, L, _ = features.shape
        if L > self.model.cfg.text_maxlen:
            raise ValueError(f"text has {L} tokens; {self.model.cfg.name} accepts at most {self.model.cfg.text_maxlen}")
        bucket = text_bucket(L, self.model.cfg.text_maxlen)
        key = (B, guided, bucket)
        if key not in self.sets:
            self.sets[key] = self._capture(B, guided, bucket, features.dtype)
        g = self.current = self.sets[key]
        g.features.zero_()
        g.features[:, :L].copy_(features)
        g.lengths.copy_(lengths)
        if g.text_graph is not None:
            g.text_graph.replay()  # writes g.text, which the step graphs read
        else:
            for dst, src in zip(_text_tensors(g.text), _text_tensors(g.encode_text()), strict=True):
                dst.copy_(src)

    def absorbs(self, bucket: int, rows: int) -> bool:
        """Whether the cross-attention runs absorbed for `rows` batch rows of text padded to `bucket` positions."""
        return self.absorb and absorption_pays(self.model.cfg, bucket, rows)

    def _capture(self, B: int, guided: bool, bucket: int, dtype: torch.dtype) -> _Graphs:
        model, schedule = self.model, self.schedule
        features = torch.zeros(B, bucket, model.cfg.text_dim, dtype=dtype, device=self.device)
        lengths = torch.ones(B, dtype=torch.long, device=self.device)
        absorbed = self.absorbs(bucket, B * (2 if guided else 1))  # CFG doubles the rows

        def encode_text():
            text = model.encode_text(features, lengths, guided)
            return model.absorb_text(text) if absorbed else text

        text_graph = None
        if self.use_graphs:
            graphs, outputs = capture_scales(lambda _: encode_text(), 1, self.pool)
            text_graph, text = graphs[0], outputs[0]
            # a capture only records: until a replay, its outputs are uninitialised pool memory. The steps' warm-up
            # below runs eagerly on them: garbage text lengths made the engine's cross-attention read before the text's
            # keys (the illegal memory access `sparvar serve` met on the H200, gone with this replay). Zero features
            # with length 1 are a valid text.
            text_graph.replay()
        else:
            text = encode_text()
        if text.batch not in self.caches:  # allocated outside the graph pool: it lives as long as the runner
            # only as long as the scales that run: skipping 2 of 13 scales at 1024² needs 4,121 of 10,521 positions
            self.caches[text.batch] = model.new_cache(text.batch, schedule, schedule.kv_len(self.run_scales - 1))
        cache = self.caches[text.batch]
        codes = [None] + [torch.zeros(B, n, model.cfg.bits, device=self.device) for n in schedule.lengths[1:]]
        if self.plan is not None:
            # the CS4A state tensors of a set captured earlier are dropped here, and a later capture in the shared pool
            # may reuse their memory while the earlier set's graphs keep those addresses. Safe because generations run
            # one at a time and each writes that state at its decision scale before any later scale reads it: no
            # pool tensor has to survive from one generation to the next
            self.plan.reset()

        def run(scale):
            cache.offset = schedule.offsets[scale]
            tokens = model.scale_input(scale, codes[scale], text)
            return model.step(tokens, scale, text, cache, self.ropes[scale], self.plan, self.backend, self.ops)

        if not self.use_graphs:
            return _Graphs(features, lengths, None, encode_text, text, cache, codes, [run], [])
        graphs, logits = capture_scales(run, self.run_scales, self.pool)
        return _Graphs(features, lengths, text_graph, encode_text, text, cache, codes, logits, graphs)

    @torch.no_grad()
    def step(self, scale: int, codes):
        check_run_scale(self.schedule, self.run_scales, scale)
        g = self.current
        if not g.graphs:  # eager mode keeps the same buffers (for debugging the captured path)
            if codes is not None:
                g.codes[scale].copy_(codes)
            return g.logits[0](scale)
        if codes is not None:
            g.codes[scale].copy_(codes)
        g.graphs[scale].replay()
        return g.logits[scale]


def check_skip(schedule: Schedule, plan, skip_last: int) -> int:
    """A runner's skip_last: in range, and the one its SparVAR plan was made for (ValueError otherwise). Returns the
    scales that run."""
    run_scales = schedule.run_scales(skip_last)
    if plan is not None and plan.skip_last != skip_last:
        raise ValueError(f"the SparVAR plan serves skip_last={plan.skip_last}, the runner skip_last={skip_last}")
    return run_scales


def check_run_scale(schedule: Schedule, run_scales: int, scale: int) -> None:
    if not 0 <= scale < run_scales:
        raise ValueError(f"scale {scale} outside the {run_scales} scales this runner runs (of {schedule.num_scales}; "
                         f"it was made to skip the last {schedule.num_scales - run_scales})")


def capture_scales(run, num_scales: int, pool) -> tuple[list, list]:
    """One CUDA graph per scale of `run(scale)` (which writes the KV cache in place), captured in scale order after a
    warm-up pass on a side stream (allocator, cuBLAS/cuDNN handles, Triton autotuning, torch.compile).
    Returns the graphs and each scale's outputs: static tensors that every replay overwrites, and that hold nothing
    until the first replay (the warm-up's results are not theirs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for scale in range(num_scales):
            run(scale)
    torch.cuda.current_stream().wait_stream(stream)
    graphs, outputs = [], []
    for scale in range(num_scales):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs.append(run(scale))
        graphs.append(graph)
    return graphs, outputs


class GraphedDecoder:
    """A tokenizer decoder whose decode is captured as one CUDA graph per latent shape: a 1024² decode is ~750
    kernels, and replaying them as a graph takes the launch gaps out (same numerics). It wraps Infinity's
    sparvar.pipeline.Decoder and HART's HartVQDecoder alike; every other attribute is the wrapped object's, read
    only: moving or casting it (to, half, cuda, ...) would leave the graphs on the old weights, so it is refused.
    Wrapping fixes the decoder's weights: its 2x upsampling convolutions run in their sub-pixel form from then on,
    eager decodes of the wrapped decoder too (sparvar.vae.freeze_subpixel_weights; after changing the wrapped
    module's weights in place, call it again, or those convolutions keep the old weights)."""

    MOVES = frozenset({"to", "half", "float", "bfloat16", "cuda", "cpu", "type", "to_empty", "load_state_dict"})

    def __init__(self, wrapped):
        from .vae import freeze_subpixel_weights

        self.wrapped = wrapped
        self.graphs: dict = {}
        module = getattr(wrapped, "module", wrapped)  # Infinity's Decoder holds the BSQDecoder; HART's is the module
        if isinstance(module, torch.nn.Module):  # its weights are fixed from here on (see MOVES)
            freeze_subpixel_weights(module)

    def __getattr__(self, name):  # only reached for names this wrapper lacks: bits_to_codes, patchify, quantize, ...
        if name == "wrapped":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        if name in GraphedDecoder.MOVES:
            raise AttributeError(f"GraphedDecoder.{name}: the captured graphs use the wrapped decoder's weights where "
                                 f"they are; {name}() the decoder before wrapping it")
        return getattr(self.wrapped, name)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The image of `latent`, in a static output buffer that the next decode of the same shape overwrites."""
        key = (tuple(latent.shape), latent.dtype, latent.device)
        if key not in self.graphs:
            static_in = latent.clone()
            graphs, outputs = capture_scales(lambda _: self.wrapped.decode(static_in), 1, None)
            self.graphs[key] = (static_in, graphs[0], outputs[0])
        static_in, graph, out = self.graphs[key]
        static_in.copy_(latent)
        graph.replay()
        return out


def _text_tensors(t: TextCondition) -> list[torch.Tensor]:
    absorbed = [x for a in t.absorbed or () for x in (a.keys, a.bias, a.values)]
    return [t.cond, t.ada, t.sos, t.key_bias, *t.k, *t.v, t.key_lens, *absorbed]


def load_cuda_engine(engine_dir: str, manifest: dict, skip_last: int = 0):
    """Runner + decoder of a torch-cuda engine directory: its stored SparVAR plan, and the spec's weights (checkpoint
    or random seed) on the GPU in the spec's dtype; for a generation loop that skips the last `skip_last` scales."""
    from .checkpoint import load_model
    from .config import get_config
    from .engine import EngineError, check_checkpoints, load_engine_plan
    from .fp8 import DEFAULT_MIN_TOKENS
    from .model import build_model
    from .pipeline import build_decoder
    from .schedule import get_schedule

    if not torch.cuda.is_available():
        raise EngineError(f"{engine_dir} is a torch-cuda engine and needs a CUDA GPU; none is available on this machine")
    spec = manifest["spec"]
    plan = load_engine_plan(engine_dir, manifest, skip_last=skip_last)  # before the weights: a stale plan fails fast
    check_checkpoints(engine_dir, manifest)  # the weights are read from the spec's files: the ones it was built from
    cfg = get_config(spec["model"])
    schedule = get_schedule(spec["resolution"], spec["aspect"], model=spec["model"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec["dtype"]]
    device = torch.device("cuda")
    model = (build_model(cfg, device=device, dtype=dtype, seed=spec["seed"]) if spec["weights"] is None
             else load_model(cfg, spec["weights"], device, dtype))
    fp8_min_tokens = DEFAULT_MIN_TOKENS if spec.get("fp8") else None  # manifests from before the option have no key
    decoder = GraphedDecoder(build_decoder(cfg, spec["vae"], device, dtype))
    return CudaGraphRunner(model, schedule, plan, fp8_min_tokens=fp8_min_tokens, skip_last=skip_last), decoder
