"""`Learner`: one rank's trainable model wrapped in DeepSpeed. A plain class, testable without Ray.

Every rank of a group builds one; methods that touch parameters (train_step, forwards under ZeRO-3,
named_weights, save/export) are collectives: all ranks call them together. `LearnerGroup`
(`rlhf_ray.learner.group`) does that fan-out from the driver.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.distributed as dist

from rlhf_ray.config.schema import LearnerConfig, ModelConfig
from rlhf_ray.learner import build, checkpoint, finite, weights
from rlhf_ray.learner.ds_config import deepspeed_config, lr_lambda
from rlhf_ray.models.kit import resolve_model_path
from rlhf_ray.utils.device import Backend, on_device
from rlhf_ray.utils.net import free_port

Batch = dict[str, torch.Tensor]
# loss_fn(learner, micro_batch) -> (scalar loss, {name: float}); the learner gives it the forward passes.
LossFn = Callable[["Learner", Batch], tuple[torch.Tensor, dict]]


def ensure_process_group(backend: Backend) -> None:
    """Join the process group; alone (world size 1) when no launcher set RANK / WORLD_SIZE."""
    import deepspeed
    import deepspeed.ops
    # DeepSpeed compiles its shared-memory CPU all-reduce op on first init (150 s, STACK.md). Only its
    # inference all-reduce uses it; training collectives go through torch.distributed (gloo / NCCL).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        # A world this process had may be gone: an in-process vLLM engine's shutdown destroys the process group
        # it joined. DeepSpeed still holds the groups it made of that world, and would hand them to this
        # learner ("Group ... is not registered"); its own teardown releases them the same way.
        from deepspeed.utils import groups
        groups._release_process_group_references(None)  # what deepspeed.comm.destroy_process_group() calls
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=backend.dist_backend, auto_mpi_discovery=False)


class Learner:
    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, *,
                 kind: Literal["policy", "reward", "value"], init_path: str, backend: Backend,
                 total_updates: int, seed: int = 0, num_threads: Optional[int] = None):
        # Import order matters: transformers' lazy model import inside DeepSpeed's ZeRO-3 conversion
        # fails unless dynamo and the model class are imported first (STACK.md).
        import torch._dynamo  # noqa: F401
        # The device is known here: telling DeepSpeed spares every run its "Setting accelerator to CPU" probe.
        os.environ.setdefault("DS_ACCELERATOR", backend.device)
        import deepspeed
        if num_threads:
            torch.set_num_threads(num_threads)
        ensure_process_group(backend)
        torch.manual_seed(seed)
        self.kind, self.backend, self.model_cfg, self.cfg = kind, backend, model_cfg, learner_cfg
        self.init_path = resolve_model_path(init_path)
        self.tokenizer = build.load_tokenizer(model_cfg, self.init_path)
        ds = deepspeed_config(learner_cfg, world_size=dist.get_world_size(), dtype=backend.dtype)
        # under ZeRO-3 the model is built partitioned as it loads (zero.Init), not whole on every rank
        model = build.build_model(model_cfg, kind, self.init_path, backend, self.tokenizer.pad_token_id,
                                  deepspeed_config=ds)
        self.lora = model_cfg.lora.enabled
        params = [p for p in model.parameters() if p.requires_grad]
        o = learner_cfg.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.scheduler, o.warmup_steps, max(1, total_updates)))
        self.ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds, model_parameters=params)
        checkpoint.weights_only_loads(self.ds_engine)  # no unpickling of checkpoint files
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.updates = 0  # optimizer steps applied (a refused step is not one); the weight version is the sync's
        self._score_hook_out: Optional[torch.Tensor] = None
        if kind == "reward":
            self._hook_score_head()

    # -- models ---------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The model DeepSpeed wraps (a peft model under LoRA)."""
        return self.ds_engine.module

    @property
    def hf_model(self) -> torch.nn.Module:
        """The HF model inside (LoRA layers injected in place)."""
        return build.unwrap_peft(self.ds_engine.module)

    def _device(self, batch: Batch) -> Batch:
        return on_device(batch, self.ds_engine.device)

    # -- forward passes -------------------------------------------------------------------------
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: Optional[torch.Tensor] = None, keep_last: int = 0) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, L, V) logits (position t predicts token t+1).

        Pass `position_ids` for left-padded rows (RL batches): HF counts positions from column 0, the
        generator from each row's first real token, and the two must agree for the log-probs to match.
        `keep_last` > 0: logits of the last that many positions only, (B, keep_last, V). RL reads only
        the response's; the LM head over the prompt (and its backward) is most of a small model's GEMMs.
        """
        extra = {} if position_ids is None else {"position_ids": position_ids}
        if keep_last:
            extra["logits_to_keep"] = keep_last
        return self.forward(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    def forward(self, **kwargs):
        """The wrapped model's HF output; tensors go to the learner's device (`rlhf_ray.models.shared_prompt`
        calls it with a KV cache)."""
        return self.ds_engine(**on_device(kwargs, self.ds_engine.device))

    @property
    def shares_prompts(self) -> bool:
        """Whether a forward may compute shared prompts once through the KV cache (not in training mode
        under gradient checkpointing: `rlhf_ray.models.shared_prompt.can_share`)."""
        from rlhf_ray.models.shared_prompt import can_share
        return can_share(self.ds_engine.module)

    @property
    def packed_mask_dtype(self) -> Optional[torch.dtype]:
        """The attention mask a forward of rows packed without their padding takes here
        (`rlhf_ray.models.packed.mask_dtype`); None: this model's attention takes none, forwards stay padded."""
        from rlhf_ray.models.packed import mask_dtype
        return mask_dtype(self.hf_model)

    def forward_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) -> (B, L) per-token values of a `kind="value"` model."""
        return self.forward_logits(input_ids, attention_mask, position_ids).squeeze(-1)

    def _hook_score_head(self) -> None:
        # The HF head pools at the last non-pad *token id*, which is wrong when the pad id also occurs
        # inside a sequence (pad = eos). We read the per-token scores and pool by the attention mask.
        # Encoder reward models (BERT-style: a `classifier` on the pooled first token) pool on their own.
        def keep(_module, _inputs, output):
            self._score_hook_out = output
        head = getattr(self.hf_model, "score", None)
        if head is not None:
            head.register_forward_hook(keep)

    def forward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) -> (B,) reward: the score head at each sequence's last attended token (any padding side)."""
        attention_mask = attention_mask.to(self.ds_engine.device)
        extra = {} if position_ids is None else {"position_ids": position_ids.to(self.ds_engine.device)}
        out = self.ds_engine(input_ids=input_ids.to(self.ds_engine.device), attention_mask=attention_mask, **extra)
        if self._score_hook_out is None:  # an encoder's own pooled score
            return out.logits[:, 0]
        per_token = self._score_hook_out.squeeze(-1)  # (B, L)
        self._score_hook_out = None
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,)
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), last]

    @contextlib.contextmanager
    def reference_context(self):
        """Forward passes inside use the frozen initial model: LoRA adapters switched off (no 2nd copy)."""
        if not self.lora:
            raise ValueError("reference_context needs model.lora.enabled=true; without LoRA the reference "
                             "is a separate frozen model (build a second Learner or scorer from the init path)")
        with self.model.disable_adapter():
            yield

    # -- training -------------------------------------------------------------------------------
    def train_step(self, loss_fn: LossFn, micro_batches: list[Batch]) -> dict:
        """One optimizer step over gradient-accumulated micro-batches (clipping and the scheduler included).

        Each micro-batch's loss is weighted by its share of this rank's rows, so micro-batches of unequal
        size give the gradient of the mean over rows; DeepSpeed then averages over ranks.
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        self.ds_engine.train()
        rows = [len(next(iter(mb.values()))) for mb in micro_batches]
        total = sum(rows)
        sums: dict[str, float] = {}
        for i, (mb, n) in enumerate(zip(micro_batches, rows)):
            self.ds_engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss, stats = loss_fn(self, self._device(mb))
            # [reliability hook] a non-finite loss or gradient is never applied (learner/finite.py)
            if (bad := finite.nonfinite(loss=float(loss.detach()))) is None:
                self.ds_engine.backward(loss * (n / total), scale_wrt_gas=False)
                if i == len(micro_batches) - 1:
                    unclipped = self._grad_norm_before_step()
                    bad = finite.nonfinite(grad_norm=unclipped)
            if bad is not None:
                return self._refuse_step(bad, i)
            self.ds_engine.step()
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n / total
        sums[f"{self.kind}/nonfinite_skipped"] = 0.0
        self.updates += 1
        norm = self.ds_engine.get_global_grad_norm() if unclipped is None else unclipped
        sums["grad_norm"] = float(norm) if norm is not None else float("nan")
        sums["lr"] = float(self.ds_engine.get_lr()[0])
        return sums

    def _refuse_step(self, problem: str, micro_batch: int) -> dict:
        """Drop the accumulated gradients; weights, optimizer and the update count stay as they were."""
        self.ds_engine.zero_grad()
        finite.refuse(problem, self.cfg.on_nonfinite, self.kind, self.updates + 1, micro_batch)
        return {f"{self.kind}/nonfinite_skipped": 1.0}

    def _grad_norm_before_step(self) -> Optional[float]:
        """ZeRO-0 keeps whole (already all-reduced) grads in `.grad` and DeepSpeed does not report their
        norm; ZeRO-1/2/3 partition them and DeepSpeed does (`get_global_grad_norm`)."""
        if self.cfg.deepspeed.zero_stage != 0:
            return None
        grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # -- weights --------------------------------------------------------------------------------
    def named_weights(self, mode: Literal["full", "adapter"] = "full",
                      frozen: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Current weights, one tensor at a time (a collective under ZeRO-3: every rank must iterate).
        frozen=False (a weight sync): "full" leaves out what training never changes (`weights.trained_modules`)."""
        if mode == "full":
            return weights.full_weights(self.hf_model, self.backend.dtype, frozen)
        if mode == "adapter":
            if not self.lora:
                raise ValueError("named_weights(mode='adapter') needs model.lora.enabled=true")
            return weights.adapter_weights(self.model)
        raise ValueError(f"named_weights mode must be 'full' or 'adapter', got {mode!r}")

    def adapter_config(self) -> dict:
        if not self.lora:
            raise ValueError("adapter_config() needs model.lora.enabled=true")
        cfg = self.model.peft_config["default"].to_dict()
        return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, extra_state: dict) -> None:
        """Model, optimizer, scheduler, RNG (per rank), `updates` and the caller's JSON `extra_state`."""
        final, tmp = Path(path), checkpoint.temp_dir_for(path)
        if self.rank == 0:
            checkpoint.fresh_dir(tmp)
        dist.barrier()
        self.ds_engine.save_checkpoint(str(tmp), tag="state", client_state={"updates": self.updates},
                                    save_latest=False, exclude_frozen_parameters=self.lora)
        checkpoint.save_rng(tmp / f"rng_rank{self.rank}.json")
        if self.rank == 0:
            checkpoint.write_json(tmp / "extra_state.json", extra_state)
        dist.barrier()
        if self.rank == 0:
            checkpoint.publish(tmp, final)
        dist.barrier()

    def load_checkpoint(self, path: str | Path) -> dict:
        path = Path(path)
        if not checkpoint.is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
        loaded, client = self.ds_engine.load_checkpoint(str(path), tag="state", load_module_strict=not self.lora)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        self.updates = int(client.get("updates", client.get("version", 0)))  # older checkpoints called it "version"
        checkpoint.load_rng(path / f"rng_rank{self.rank}.json")
        return json.loads((path / "extra_state.json").read_text())

    def export_hf(self, path: str | Path, merge_lora: bool = True) -> None:
        """A folder transformers loads back: the full model (LoRA merged, fp weights) or the peft adapter.

        Streamed: rank 0 copies each tensor to host memory as it is gathered and writes size-capped
        shards (`rlhf_ray.learner.export`), so the device never holds more than the tensor in flight."""
        from rlhf_ray.learner.export import write_adapter, write_full
        final, tmp = Path(path), checkpoint.temp_dir_for(path)
        if self.rank == 0:
            checkpoint.fresh_dir(tmp)
        adapter_only = self.lora and not merge_lora
        mode = "adapter" if adapter_only else "full"
        if self.rank != 0:
            if self.cfg.deepspeed.zero_stage == 3:
                weights.drain(self.named_weights(mode))
        elif adapter_only:
            write_adapter(tmp, self.named_weights(mode), self.model.peft_config["default"], self.init_path)
        else:
            write_full(tmp, self.named_weights(mode), self.hf_model.config, type(self.hf_model).__name__)
        if self.rank == 0:
            self.tokenizer.save_pretrained(tmp)
            checkpoint.publish(tmp, final)
        dist.barrier()

    def close(self) -> None:
        """Release the model and optimizer for a next learner in this process (the stages of a shared Ray Train
        run). Dropping the last reference is not enough: a ZeRO optimizer's gradient hooks sit on the
        parameters' autograd nodes, a cycle through C++ that Python's collector cannot see; on an H100 a
        135M model's optimizer state (1.8-2.1 GiB) stayed allocated. DeepSpeed's `destroy` removes them."""
        self.ds_engine.destroy()
