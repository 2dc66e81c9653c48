"""The peer frameworks' own Llama-style models and training components, for benchmarks/throughput.py's loop.

Each builder returns a `Peer`: the model (on the device, fp32 master weights), a `loss(tokens)` callable that runs
the framework's forward and loss the way its own train loop does (its compile and float8 application functions
already applied), and a note of the settings used, which the table prints. The optimizer (fused torch AdamW,
what both frameworks build on one GPU) and the timing are the harness's.

torchtitan 0.3.0: `Llama3Model` from a `Llama3Model.Config` at our shape (fused wqkv, their default), attention
  through their default backend for language models ("flex", block-causal masks from per-row positions; with no
  document boundaries in random tokens that is plain causal attention) or "sdpa" (their maskless
  `ScaledDotProductAttention`, is_causal); `init_weights()` on the device as their Trainer does after building on
  meta; `apply_compile` (each TransformerBlock, fullgraph) and their `CrossEntropyLoss` compiled (compile
  components "model" and "loss", their default); float8 through their `Float8LinearConverter` (recipe "rowwise",
  the LM head `output` filtered out). Their Trainer casts to bf16 through FSDP2's MixedPrecisionPolicy even on one
  GPU; here a bf16 autocast does that, as for every other row (this harness runs without torch.distributed).
OLMo-core 3.0.0: `TransformerConfig.llama_like(...)` at our shape (RMSNorm, SwiGLU, no biases, untied LM head)
  `.build()`, `init_weights()`; `apply_compile()` (each block, and the LM head); the loss computed inside the LM
  head (labels passed to the model, as their TransformerTrainModule does); float8 through `apply_fp8(Float8Config())`
  (torchao tensorwise Float8Linear, LM head ignored); bf16 autocast (their train module's `autocast_precision` on a
  single device).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from llmtrain.model.config import ModelConfig


@dataclass
class Peer:
    model: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]  # (micro_batch, seq + 1) tokens -> mean loss
    version: str
    settings: str


def _version(dist: str) -> str:
    from importlib.metadata import version

    return f"{dist} {version(dist)}"


def with_data_parallel_mesh_dims() -> bool:
    """torchtitan 0.3.0 imports `DataParallelMeshDims` from torch.distributed.fsdp, a name that torch releases
    after 2.11 have, for its FSDP helpers (signatures, and the multi-GPU sharding path), which one GPU never runs;
    on torch 2.11 that import stops every torchtitan model module. Where torch lacks the name, a stand-in class is
    put there so the model, compile and loss code can load; anything else missing still fails with its own error.
    Returns whether the stand-in was needed (the row's settings say so)."""
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "DataParallelMeshDims"):
        return False
    fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {"__doc__": "stand-in (benchmarks/peers.py)"})
    return True


def torchtitan_peer(cfg: ModelConfig, device: torch.device, compile: bool, float8: bool,
                    attention: str = "flex") -> Peer:
    stand_in = with_data_parallel_mesh_dims()
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.compile import apply_compile
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    if attention not in ("flex", "sdpa"):
        raise ValueError(f"torchtitan attention {attention!r}: use 'flex' (their default) or 'sdpa'")
    d, vocab = cfg.d_model, cfg.vocab_size
    layers = _build_llama3_layers(
        n_layers=cfg.n_layer, dim=d, n_heads=cfg.n_head, hidden_dim=cfg.d_ff, fuse_qkv=True,
        rope=ComplexRoPE.Config(dim=d // cfg.n_head, max_seq_len=cfg.max_seq_len, theta=cfg.rope_theta),
        attn_backend="flex")
    if attention == "sdpa":  # their maskless backend: is_causal, no masks built
        from torchtitan.models.common.attention import ScaledDotProductAttention

        for layer in layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    init = {"weight": nn.init.ones_}
    config = Llama3Model.Config(
        dim=d, vocab_size=vocab, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=d,
                                        param_init={"weight": lambda w: nn.init.normal_(w, std=1.0)}),
        norm=RMSNorm.Config(normalized_shape=d, param_init=init),
        lm_head=Linear.Config(in_features=d, out_features=vocab,
                              param_init={"weight": lambda w: nn.init.trunc_normal_(w, std=d ** -0.5)}))
    if float8:
        from torchtitan.components.quantization.float8 import Float8LinearConverter

        config = Float8LinearConverter(Float8LinearConverter.Config(
            recipe_name="rowwise", filter_fqns=["output"], model_compile_enabled=compile)).convert(config)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)
    compile_config = CompileConfig(enable=compile, components=["model", "loss"])
    if compile:
        apply_compile(model, compile_config=compile_config, parallel_dims=types.SimpleNamespace(tp_enabled=False))
    loss_fn = CrossEntropyLoss(CrossEntropyLoss.Config(), compile_config=compile_config)

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        masks = model.get_attention_masks(positions=positions) if attention == "flex" else None
        pred = model(inputs, positions=positions, attention_masks=masks)
        return loss_fn(pred, labels, torch.tensor(labels.numel(), device=labels.device))[0]

    settings = (f"attention {attention}, fused wqkv, compile {'per block + loss' if compile else 'off'}, "
                f"float8 {'rowwise (LM head bf16)' if float8 else 'off'}"
                + (", torch.distributed.fsdp.DataParallelMeshDims stood in (not in this torch)" if stand_in else ""))
    return Peer(model, loss, _version("torchtitan"), settings)


def _without_cached_path() -> None:
    """OLMo-core imports `cached_path` at module level for remote config and checkpoint paths, and cached_path
    imports boto3 and google-cloud-storage; nothing the model and loss use touches it. Where it is not installed,
    a stand-in that refuses every call keeps those imports working."""
    try:
        import cached_path  # noqa: F401
        return
    except ImportError:
        pass

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cached_path is not installed (the throughput benchmark reads no remote paths)")

    module, schemes = types.ModuleType("cached_path"), types.ModuleType("cached_path.schemes")
    module.cached_path = refuse
    schemes.SchemeClient = type("SchemeClient", (), {"recoverable_errors": ()})
    schemes.S3Client = type("S3Client", (schemes.SchemeClient,), {})
    schemes.add_scheme_client = refuse
    module.schemes = schemes
    sys.modules.update({"cached_path": module, "cached_path.schemes": schemes})


def olmo_core_peer(cfg: ModelConfig, device: torch.device, compile: bool, float8: bool) -> Peer:
    _without_cached_path()
    from olmo_core.nn.transformer import TransformerConfig

    config = TransformerConfig.llama_like(
        d_model=cfg.d_model, vocab_size=cfg.vocab_size, n_layers=cfg.n_layer, n_heads=cfg.n_head,
        rope_theta=int(cfg.rope_theta), layer_norm_eps=cfg.norm_eps,
        hidden_size_multiple_of=64 if cfg.d_model < 256 else 256)
    model = config.build(init_device=str(device))
    model.init_weights(device=device, max_seq_len=cfg.max_seq_len)
    if float8:
        from olmo_core.float8 import Float8Config

        model.apply_fp8(Float8Config(enabled=True))
    if compile:
        model.apply_compile()

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens[:, :-1], labels=tokens[:, 1:]).loss

    settings = (f"attention their default backend (torch SDPA; flash-attn is not installed), "
                f"compile {'per block + LM head' if compile else 'off'}, loss in the LM head, "
                f"float8 {'tensorwise (LM head bf16)' if float8 else 'off'}")
    return Peer(model, loss, _version("ai2-olmo-core"), settings)
