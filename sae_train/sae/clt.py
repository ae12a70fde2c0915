"""Cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit Tracing"): one encoder per layer
reading that layer's MLP input, and decoders from each layer's latents to the MLP outputs of
that layer and of every later one.

Shapes (L = cfg.n_layers layers, d_sae latents per layer: circuit-tracer's d_transcoder):
    W_enc [L, d_in, d_sae]   b_enc [L, d_sae]   threshold [L, d_sae]
    W_dec_s [d_sae, L - s, d_out] for s = 0..L-1 (circuit-tracer's layout)   b_dec [L, d_out]
    W_skip [L, d_in, d_out] (cfg.skip; circuit-tracer's CLT orientation, x_l @ W_skip[l])
On x [B, L, d_in] (x[:, l]: layer l's MLP input) it computes
    f_l     = act(x_l @ W_enc[l] + b_enc[l])
    y_hat_j = sum over s <= j of f_s @ W_dec_s[:, j - s] + b_dec[j]  (+ x_j @ W_skip[j])
the reconstruction of layer j's MLP output. Training selects BatchTopK per layer (the k * B
largest pre-activations of each layer's batch: k latents per token and layer on average);
inference is f = z * [z > threshold] per latent, the threshold a running average of the smallest
kept activation of each layer (BatchTopK's `track_threshold`). That is JumpReLU, exactly what circuit-tracer
computes from `threshold_{l}`, so the export is exact.

Loss: the sum over layers of each layer's MSE, plus aux_coefficient * AuxK. Every source site
is normalised to unit mean norm by its own constant, as an SAE's input; every target site to
unit variance (the trainer's `_initialise_layers`), so the summed MSE is the sum of the layers'
FVUs. The encoders serve every later layer, so the targets' scales weigh the layers against each
other: at unit mean norm, SmolLM2's layer 2 (massive activations: 4.9x the variance of the
others per unit norm) outweighed the rest, and layer 0, whose MLP the model needs most, lagged a
per-layer transcoder the most (8 layers, 400k tokens, seeds 0/1: spliced CE 2.6281/2.6308 ->
2.6202/2.6081, KL 0.411/0.401 -> 0.399/0.389, layer 0's FVU 0.128 -> 0.120). AuxK: the dead
latents of every layer (top aux_k of each layer's dead pre-activations) reconstruct the detached
residual of all layers. The decoders are free and start at zero, as a BatchTopK transcoder's (sae/batchtopk.py):
the first steps fit them to what the centred latents fire on while the encoders stay where init
put them; renormalised to unit norm after every step instead, a fifth of the latents died
(SmolLM2-135M, 8 layers, 400k tokens: 21.8% dead at the end against 0.3%, FVU
0.125 against 0.116).

Decode is sparse: layer s's selected entries go through one embedding bag over W_dec_s viewed
as [d_sae, (L - s) d_out], so a token costs k (L - s) d_out multiply-adds per source layer,
k L (L + 1) / 2 d_out in all -- the L^2 of a CLT, in the decoders only; the encoders are L
GEMMs of [B, d_in] x [d_in, d_sae]. Gradients come from the selected entries alone
(sae/sparse.py's embedding-bag backward, per layer into one W_enc gradient). On CPU the same
products run in the C kernels (sae/kernels: selection, decode into the [B, L, d_out] buffer's
slice, the values' and decoders' gradients, the encoders' from each layer's CSR blocks), as the
fused step of the other TopK-family architectures does.

Folding (Contract 2) is exact for any nonlinearity: W_enc[l] *= scale_l, decoder slices to
layer j and b_dec[j] divided by the target scale t_j, W_skip[j] *= scale_j / t_j; then each
latent's raw-unit decoder norm n is moved into its encoder, bias and threshold (z * n > theta * n
iff z > theta), leaving unit-norm decoders on raw activations.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_train.errors import UserError
from sae_train.sae import kernels, sparse
from sae_train.sae.base import SAE, SAEOutput, SparseLatents, geometric_median
from sae_train.sae.batchtopk import track_threshold
from sae_train.sae.config import SAEConfig, config_error
from sae_train.sae.ops import auxk_ratio, batch_topk_selection
from sae_train.sae.topk import annealed_k


class CrossLayerTranscoder(SAE):
    architecture = "clt"
    config_fields = frozenset({"k", "aux_k", "aux_coefficient", "batchtopk_threshold_beta", "n_layers", "k_anneal"})
    revival = "auxk"
    step_gemms = ("encoder",)  # per layer; the trainer times L of them. Decode and backward are sparse.
    saelens_architecture = saelens_training_architecture = "clt"  # no SAELens equivalent: export for circuit-tracer
    cross_layer = True
    shardable_latents = False  # per-layer encoders and L-wide decoders: no latent-shard layout (sae/shard.py)
    gemm_weight_names = ("W_enc",)  # the decoders are read by the sparse decode, in fp32
    threshold: Tensor
    threshold_updates: Tensor

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if not cfg.target:
            raise config_error(
                cfg,
                "target",
                "the MLP-output site of each layer",
                "A cross-layer transcoder writes every layer's MLP output: set sae.target=blocks.{layer}.hook_mlp_out "
                "with sites=[blocks.*.mlp.hook_in].",
            )
        if not isinstance(cfg.k, int) or cfg.k <= 0:
            raise config_error(
                cfg, "k", "a positive integer", "Set sae.k (active latents per token and layer), e.g. 32."
            )
        d_sae = cfg.d_sae or cfg.expansion_factor * cfg.d_in
        if cfg.d_in and cfg.k > d_sae:
            raise config_error(cfg, "k", f"at most d_sae = {d_sae}", "Lower sae.k or raise sae.d_sae.")

    def _init_parameters(self, gen: torch.Generator) -> None:
        cfg = self.cfg
        L, d_in, d_out, d_sae = cfg.n_layers, cfg.d_in, cfg.d_out, cfg.d_sae
        if L <= 0:
            raise UserError("SAE config: a cross-layer transcoder needs n_layers >= 1 (the number of its sites).")
        W_enc = torch.randn(L, d_in, d_sae, generator=gen)
        self.W_enc = nn.Parameter(W_enc / W_enc.norm(dim=1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(L, d_sae))
        for s in range(L):
            self.register_parameter(f"W_dec_{s}", nn.Parameter(torch.zeros(d_sae, L - s, d_out)))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out))
        self.register_buffer("threshold", torch.zeros(L, d_sae))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        names = ("W_enc", "b_enc", "b_dec", "threshold", *self.decoder_names)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(L, d_in, d_out))
            names = (*names, "W_skip")
        self.inference_tensors = names

    # ------------------------------------------------------------------ structure

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def decoder_names(self) -> tuple[str, ...]:
        return tuple(f"W_dec_{s}" for s in range(self.cfg.n_layers))

    def decoder(self, s: int) -> Tensor:
        """W_dec_s [d_sae, L - s, d_out]: layer s's latents to the outputs of layers s..L-1."""
        return getattr(self, f"W_dec_{s}")

    @property
    def n_latents(self) -> int:
        return self.cfg.n_layers * self.cfg.d_sae

    @property
    def unit_norm_decoder(self) -> bool:
        """False: the decoders are free (module docstring); `fold` moves their norms into the encoders."""
        return False

    # ------------------------------------------------------------------ inference

    def _check_layers(self, t: Tensor | None, width: int, what: str) -> Tensor:
        expected = f"[n_tokens, {self.n_layers}, {width}] (one row per token and layer, layers in order)"
        if t is None or t.dim() != 3 or t.shape[1:] != (self.n_layers, width):
            got = "none" if t is None else f"shape {tuple(t.shape)}"
            raise UserError(f"Cross-layer transcoder {what}: got {got}; expected {expected}.")
        if not t.is_floating_point():
            raise UserError(f"Cross-layer transcoder {what} has dtype {t.dtype}; expected floating-point activations.")
        return t.to(self._acc_dtype)

    def _activation(self, z: Tensor) -> Tensor:
        """JumpReLU with the per-layer thresholds, on z [B, L, d_sae]."""
        return z * (z > self.threshold).to(z.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [B, L, d_sae] (fp32) with inference semantics."""
        x = self._check_layers(x, self.cfg.d_in, "input")
        with torch.autocast(x.device.type, enabled=False):
            z = torch.bmm(x.transpose(0, 1).to(self._gemm_dtype), self.gemm_weight("W_enc")).to(self._acc_dtype)
            return self._activation(z.transpose(0, 1) + self.b_enc)

    def decode(self, f: Tensor) -> Tensor:
        """sum over s <= j of f_s @ W_dec_s[:, j - s] + b_dec[j]: [B, L, d_out] (fp32) from
        dense latents [B, L, d_sae] (`reconstruct` adds the skip term)."""
        B, L, d_out = f.shape[0], self.n_layers, self.cfg.d_out
        with torch.autocast(f.device.type, enabled=False):
            out = torch.zeros(B, L, d_out, dtype=self._acc_dtype, device=f.device) + self.b_dec
            for s in range(L):
                out[:, s:] += self._matmul(f[:, s], self.decoder(s).flatten(1)).view(B, L - s, d_out)
            return out

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(latents [B, L, d_sae], outputs [B, L, d_out]) with inference semantics."""
        latents = self.encode(x)
        out = self.decode(latents)
        if self.cfg.skip:
            out = out + self._skip(self._check_layers(x, self.cfg.d_in, "input"))
        return latents, out

    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        """Latents [B, d_sae] of one layer from its inputs x [B, d_in] (inference semantics)."""
        with torch.autocast(x.device.type, enabled=False):
            z = self._matmul(x.to(self._acc_dtype), self.W_enc[layer]) + self.b_enc[layer]
            return z * (z > self.threshold[layer]).to(z.dtype)

    def decode_layer(self, latents: Sequence[Tensor], layer: int, x: Tensor | None = None) -> Tensor:
        """Layer `layer`'s output [B, d_out] from the latents of layers 0..layer (`encode_layer`),
        plus the skip term from its input x where the CLT has one: what replaces that layer's
        MLP output in the replacement model."""
        with torch.autocast(latents[0].device.type, enabled=False):
            out = self.b_dec[layer] + sum(
                self._matmul(latents[s], self.decoder(s)[:, layer - s]) for s in range(layer + 1)
            )
            if self.cfg.skip:
                if x is None:
                    raise ValueError("a CLT with a skip connection needs the layer's input x")
                out = out + self._matmul(x.to(self._acc_dtype), self.W_skip[layer])
            return out

    def _skip(self, x: Tensor) -> Tensor:
        return torch.bmm(x.transpose(0, 1), self.W_skip).transpose(0, 1)

    # ------------------------------------------------------------------ training

    def forward(
        self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0
    ) -> SAEOutput:
        """Training semantics on normalised x [B, L, d_in] and targets [B, L, d_out]; dead_mask
        bool [L * d_sae] (layer-major). Returns x_hat [B, L, d_out], "mse" summed over layers,
        l0 the active latents per token over all layers, and latents as `SparseLatents` over L * B
        rows (row l * B + b: layer l of token b)."""
        x = self._check_layers(x, self.cfg.d_in, "input")
        y = self._check_layers(target, self.cfg.d_out, "target")
        if x.shape[0] != y.shape[0]:
            raise UserError(f"Cross-layer transcoder: {x.shape[0]} input rows but {y.shape[0]} target rows.")
        if dead_mask is not None and dead_mask.shape != (self.n_latents,):
            raise ValueError(f"dead_mask must be bool [{self.n_latents}], got {tuple(dead_mask.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            if not self.cfg.skip:
                return self._forward_torch(x, y, dead_mask, sparsity_scale)
            skip = self._skip(x)
            out = self._forward_torch(x, y - skip, dead_mask, sparsity_scale)
            out.x_hat = out.x_hat + skip
            return out

    def _forward_torch(self, x: Tensor, target: Tensor, dead_mask: Tensor | None, sparsity_scale: float) -> SAEOutput:
        B, L, d_sae, d_out = x.shape[0], self.n_layers, self.cfg.d_sae, self.cfg.d_out
        world = sparse.selection_world()
        xl = x.transpose(0, 1).contiguous()  # [L, B, d_in]: each layer's rows contiguous
        W_gemm, b_enc = self.gemm_weight("W_enc"), self.b_enc.detach()
        k = annealed_k(self.cfg, self.progress)
        layer_dead = None if dead_mask is None else dead_mask.view(L, d_sae)
        aux_ks = [0] * L if layer_dead is None else self._aux_ks(layer_dead)
        fused = self._fast_path(x)  # the C kernels: selection, decodes and their gradients
        select = batch_topk_selection if fused else sparse.batch_topk
        layers, pres, mains, min_kept = [], [], [], []
        auxes: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # layers with AuxK picks
        start = 0
        with torch.no_grad():
            for s in range(L):
                z = xl[s].to(self._gemm_dtype) @ W_gemm[s]
                sel = select(z, b_enc[s], k, world)
                ids, rows, pre = sel.ids, sel.rows, sel.values
                n_main = ids.numel()
                main = None if fused else sparse.ByLatent(ids, d_sae)
                every, blocks = main, [(sel.offsets, ids)]
                if aux_ks[s]:
                    assert layer_dead is not None  # picks only where a mask came
                    aux_k, dead = aux_ks[s], layer_dead[s]
                    a_ids, a_pre = sparse.topk_rows(z, b_enc[s], aux_k, dead)
                    a_ids, a_rows = a_ids.view(-1), torch.arange(B * aux_k, device=x.device) // aux_k
                    a_offsets = torch.arange(0, B * aux_k + 1, aux_k, device=x.device)
                    auxes[s] = (a_ids, a_rows, a_offsets, dead[a_ids])
                    blocks.append((a_offsets, a_ids))
                    ids, rows, pre = (
                        torch.cat([ids, a_ids]),
                        torch.cat([rows, a_rows]),
                        torch.cat([pre, a_pre.view(-1)]),
                    )
                    every = None if fused else sparse.ByLatent(ids, d_sae)
                mains.append((main, sel.ids, sel.rows, sel.offsets, sel.keep, n_main))
                layers.append((start, start + ids.numel(), rows, every, blocks if fused else None))
                pres.append(pre)
                assert sel.min_kept is not None  # batch_topk always reports it
                min_kept.append(sel.min_kept)
                start += ids.numel()
                del z
        pre = _LayerPreacts.apply(torch.cat(pres), xl, layers, self.W_enc, self.b_enc)
        x_hat = torch.zeros(B, L, d_out, dtype=self._acc_dtype, device=x.device) + self.b_dec
        values, ids_all, offsets_all = [], [], []
        for s, ((main, ids, rows, offsets, keep, n_main), (lo, *_)) in enumerate(zip(mains, layers)):
            vals = torch.relu(pre[lo : lo + n_main])
            if keep is not None:
                vals = torch.where(keep, vals, torch.zeros_like(vals))
            table = self.decoder(s).view(d_sae, (L - s) * d_out)
            x_hat = _DecodeInto.apply(x_hat, s, vals, table, ids, main, rows, offsets)
            values.append(vals.detach())
            ids_all.append(ids)
            offsets_all.append(offsets[:-1] + sum(v.numel() for v in values[:-1]))
        mse = F.mse_loss(x_hat, target, reduction="sum") / B  # summed over layers; one pass each way
        auxk = x_hat.new_zeros(())
        if dead_mask is not None:
            e_hat = torch.zeros_like(x_hat)
            for s, (a_ids, a_rows, a_offsets, valid) in auxes.items():
                (lo, hi, *_), (*_, n_main) = layers[s], mains[s]
                a_pre = pre[lo + n_main : hi]
                a_vals = torch.where(valid, torch.relu(a_pre), torch.zeros_like(a_pre))
                table = self.decoder(s).view(d_sae, (L - s) * d_out)
                groups = None if fused else sparse.ByLatent(a_ids, d_sae)
                e_hat = _DecodeInto.apply(e_hat, s, a_vals, table, a_ids, groups, a_rows, a_offsets)
            e = (target - x_hat).detach()
            auxk = torch.where(dead_mask.any(), auxk_ratio(e_hat.flatten(1), e.flatten(1)), auxk)
        loss = mse + self.cfg.aux_coefficient * auxk
        vals_cat, ids_cat = torch.cat(values), torch.cat(ids_all)
        offsets_cat = torch.cat([*offsets_all, vals_cat.new_full((1,), vals_cat.numel(), dtype=offsets_all[0].dtype)])
        active = (vals_cat != 0).float()
        layer_of = torch.cat([torch.full((v.numel(),), s, device=x.device) for s, v in enumerate(values)])
        counts = torch.zeros(self.n_latents, device=x.device).index_add_(0, layer_of * d_sae + ids_cat, active)
        out = SAEOutput(
            x_hat,
            {"loss": loss, "mse": mse, "auxk": auxk},
            active.sum() / B,
            counts > 0,
            SparseLatents(vals_cat, ids_cat, offsets_cat, d_sae),
        )
        out.stats["min_kept"] = torch.stack(min_kept)
        return out

    def _aux_ks(self, layer_dead: Tensor) -> list[int]:
        """AuxK's picks per token in each layer (layer_dead: bool [L, d_sae]): aux_k, at most the
        layer's dead latents (a pick beyond them decodes nothing, and every pick costs a decode to
        each later layer: at 30 layers the 288 default picks were most of the step). Counted
        where the mask is on the host; on a device bounded by `max_dead` instead, which needs no
        sync."""
        cap = min(self.cfg.aux_k, self.cfg.d_sae)
        if layer_dead.device.type == "cpu":
            return [min(cap, n) for n in layer_dead.sum(1).tolist()]
        return [cap if self.max_dead is None else min(cap, self.max_dead)] * self.n_layers

    def after_step(self, out: SAEOutput) -> None:
        """Fold each layer's smallest kept activation of this batch into its threshold."""
        m = out.stats["min_kept"].to(self.threshold)[:, None]
        track_threshold(self.threshold, self.threshold_updates, m, self.cfg.batchtopk_threshold_beta)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, target: Tensor | None = None) -> None:
        """b_dec[l] from layer l's targets (cfg.b_dec_init), b_enc[l] = -mean(x_l) @ W_enc[l]
        (each layer's pre-activations centred on the sample, as a transcoder's)."""
        x = self._check_layers(x, self.cfg.d_in, "input")
        y = self._check_layers(target, self.cfg.d_out, "target")
        for i in range(self.n_layers):
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[i] = geometric_median(y[:, i])
            elif self.cfg.b_dec_init == "mean":
                self.b_dec[i] = y[:, i].mean(0)
            else:
                self.b_dec[i] = 0
            self.b_enc[i] = -(x[:, i].mean(0) @ self.W_enc[i])

    @torch.no_grad()
    def fold(self, scale: float | Sequence[float], target_scale: float | Sequence[float] | None = None) -> SAE:
        """Inference copy acting on raw activations: x_raw[:, l] * scale[l] is layer l's
        normalised input, y_raw[:, j] * target_scale[j] its normalised target (one number: the
        same for every layer). See the module docstring for the algebra."""
        if self.folded:
            raise ValueError("this cross-layer transcoder is already folded; fold the training model instead")
        L = self.n_layers
        sc = torch.as_tensor(scale, dtype=torch.float64).expand(L).clone()
        t = torch.as_tensor(scale if target_scale is None else target_scale, dtype=torch.float64).expand(L).clone()
        if not (bool((sc > 0).all()) and bool((t > 0).all())):
            raise ValueError(f"normalization scales must be > 0, got {sc.tolist()} and {t.tolist()}")
        sae = copy.deepcopy(self)
        dt = sae.W_enc.dtype
        sae.W_enc.mul_(sc.to(dt)[:, None, None])
        sae.b_dec.div_(t.to(dt)[:, None])
        if self.cfg.skip:
            sae.W_skip.mul_((sc / t).to(dt)[:, None, None])
        for s in range(L):
            W = sae.decoder(s)
            W.div_(t[s:].to(dt)[None, :, None])
            norms = W.flatten(1).norm(dim=1)
            norms = torch.where(norms > 0, norms, torch.ones_like(norms))
            W.div_(norms[:, None, None])
            sae.W_enc[s].mul_(norms)
            sae.b_enc[s].mul_(norms)
            sae.threshold[s].mul_(norms)
        sae.folded = True
        sae.normalization_scale, sae.target_normalization_scale = sc.tolist(), t.tolist()
        return sae


class _DecodeInto(torch.autograd.Function):
    """y[:, s:] += the sparse decode (`sparse.SparseDecode`) of source layer s's entries (CSR
    `offsets`, latent `ids`) over its decoder viewed as [d_sae, (L - s) d_out], in place on y
    [B, L, d_out]; returns y. The layers' decodes accumulate in one buffer, each freed once added,
    and the backward passes the output's gradient on as it is, giving layer s the slice g[:, s:]:
    an in-place slice sum through autograd would clone and zero-fill the whole [B, L, d_out]
    gradient once per layer, and summing L separate decodes would hold all L(L+1)/2 [B, d_out]
    blocks at once. With `groups` (the entries grouped by latent) it runs embedding bags; without,
    the C kernels, which read and write the slice in place (rows L d_out apart) and group the
    entries by latent with one counting pass instead of a sort."""

    @staticmethod
    def forward(
        ctx,
        y: Tensor,
        s: int,
        values: Tensor,
        table: Tensor,
        ids: Tensor,
        groups: sparse.ByLatent | None,
        rows: Tensor,
        offsets: Tensor,
    ) -> Tensor:  # type: ignore[override]
        B, L, d_out = y.shape
        if groups is None:
            kernels.csr_spmm(offsets, ids, values, table, out=y[:, s:].flatten(1), accumulate=True)
        else:
            part = F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=values, include_last_offset=True)
            y[:, s:] += part.view(B, L - s, d_out)
        ctx.mark_dirty(y)
        ctx.save_for_backward(values, table, ids, rows, offsets)
        ctx.groups, ctx.s = groups, s
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        values, table, ids, rows, offsets = ctx.saved_tensors
        if ctx.groups is not None:
            mine = g[:, ctx.s :].reshape(g.shape[0], -1)
            grads = sparse.decode_backward(mine, values, table, ctx.groups, rows, offsets, ctx.needs_input_grad[2:4])
            return g, None, *grads, None, None, None, None
        g = g.contiguous()
        mine = g[:, ctx.s :].flatten(1)
        g_values = kernels.csr_sddmm(offsets, ids, mine, table)
        coff, crow, perm = kernels.csr_transpose(offsets, ids, table.shape[0])
        g_table = kernels.csr_spmm(coff, crow, values, mine, perm=perm)
        return g, None, g_values, g_table, None, None, None, None


class _LayerPreacts(torch.autograd.Function):
    """The selected pre-activations of every layer (`pre`, all layers' entries concatenated, as
    the selection computed them without autograd) as a function of W_enc [L, d_in, d_sae] and
    b_enc [L, d_sae]: `sparse.SparsePreact`'s embedding-bag backward per layer (or, where the
    layer lists its entries as CSR blocks by token, the C kernels' sparse product), written into
    one gradient (a per-layer slice of the parameter would give every layer a full-size gradient)."""

    @staticmethod
    def forward(ctx, pre: Tensor, xl: Tensor, layers: list, W_enc: Tensor, b_enc: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xl)
        # per layer: (start, stop, token of each entry, ByLatent of its entries or None, CSR blocks or None)
        ctx.layers = layers
        ctx.shapes = W_enc.shape, b_enc.shape
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, gp: Tensor):  # type: ignore[override]
        (xl,) = ctx.saved_tensors
        w_shape, b_shape = ctx.shapes
        d_in = w_shape[1]
        grad_W = gp.new_zeros(w_shape)
        grad_b = gp.new_zeros(b_shape)
        for i, (start, stop, rows, groups, blocks) in enumerate(ctx.layers):
            if blocks is not None:  # the C kernels: each CSR block (main, AuxK's) by latent, summed in place
                sums = torch.zeros(len(blocks), w_shape[2])
                for j, (offsets, ids) in enumerate(blocks):
                    coff, crow, perm = kernels.csr_transpose(offsets, ids, w_shape[2])
                    n = ids.numel()
                    kernels.csr_spmm(
                        coff, crow, gp[start : start + n], xl[i], perm=perm, out=grad_W[i],
                        transpose_out=True, accumulate=True, val_sum=sums[j],
                    )  # fmt: skip
                    start += n
                grad_b[i] = sums.sum(0)
                continue
            order, bags = groups.get()
            table = torch.cat([xl[i], xl.new_ones(xl.shape[1], 1)], dim=1).to(gp.dtype)
            g = F.embedding_bag(
                rows[order], table, bags, mode="sum", per_sample_weights=gp[start:stop][order], include_last_offset=True
            )
            grad_W[i] = g[:, :d_in].t()
            grad_b[i] = g[:, d_in]
        return None, None, None, grad_W, grad_b
