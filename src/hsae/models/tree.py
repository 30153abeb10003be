"""Tree SAE (Cao, Nhat, Alharbi, Nguyen & Thai 2026, arXiv 2605.07922).

One TopK SAE whose dictionary is split into contiguous "privilege layers" of sizes s_1..s_L
(`layer_fractions`, default [0.25, 0.75], the paper's 2-layer GPT-2 split 6144/18432). Every latent
of layer l >= 2 has a parent in an earlier layer or the virtual, always-active root (-1); layer-1
latents always have the root. Stored in the `parents` buffer; `hierarchy()` reports it.

Activation condition (Eq. 6): the TopK is taken over the whole dictionary, then gated layer by layer,
f*_i = f_i * 1[f*_parent(i) > 0] (root: always on), so a child never fires without its parent
(coverage 1 by construction) and the realised L0 is <= k. Gated entries stay in the (n, k) codes with
value 0.

Reconstruction condition through the loss (Eq. 7-9): L = sum_l || b + sum_{t<=l} xhat_t - x ||^2
("mse" = the full reconstruction, "layer_mse" = the strict prefixes) + sum_l alpha_l AuxK_l, where
AuxK_l reconstructs the residual of layers <= l from the k_aux largest pre-activations of layer l's
dead latents; alpha_1 = `aux_coef` (1/32), alpha_{l>=2} = `aux_coef_children` (1/32; paper: 0, its
alternative is 1/128 on all layers). For l >= 2 only dead latents whose parent fired in the row take
part (`aux_gated`, our reading of "dead children learn to reconstruct their parents' error").

Dynamic reallocation (Algorithms 1-2), simplified where the paper is unclear:
- Capacity: every training step the batch loss is split equally among the candidate parents that
  fired in the batch (the root always counts); accumulated in the `capacity` buffer, reset after
  each reallocation.
- At a reallocation, for each layer l >= 2 the target child counts over its candidate parents (live
  latents of earlier layers plus the root) maximise min_p C_p / k_p (greedy max-heap on C_p/(k_p+1),
  popped s_l times); only *dead* children (the trainer's dead window) move, from parents over quota
  to parents under it, first-fit.
- Schedule, scaled from the paper's 97,657-step run: first event after `realloc_first` (3%) of the
  steps, the interval doubling each time, capped at `realloc_max` (10%); at `realloc_stop` (51%) all
  dead latents are reset to the root and no reallocation follows.
- Initial allocation (unspecified in the paper): uniformly random over the earlier layers' latents
  and the root, from the init seed.
Our options, on by default (docs/hierarchy.md has the measurements: with the paper's gate and
batch capacity the children die under the gate and the tree stays nearly flat, on hsae's synthetic
forests and on SAELens's):
- `selection="pool"` (paper: "gate"): TopK over a candidate pool instead of raw TopK then gate: k
  greedy picks, each the largest pre-activation among latents whose parent is the root or an
  earlier pick of the row, so a child can be selected whenever its parent is (same activation
  condition, L0 = k).
- `capacity_mode="row"` (paper: "batch"): each row's squared error is split among the parents
  active in that row (and the root), so dead children go to parents whose rows are poorly
  reconstructed rather than evenly to every parent that fired somewhere in the batch.
- `reparent=true`: at each reallocation and at `realloc_stop`, live children move to the
  earlier-layer latent they co-fired with most (coverage >= `reparent_min_coverage`), so children
  of the root that fire with one parent get attached to it.
- `aux_coef_children` 1/32 (paper: 0): AuxK on the child layers, gated as above.
The paper's method: `-o selection=gate -o capacity_mode=batch -o reparent=false -o aux_coef_children=0`.
Not implemented: per-token input standardisation and Var(x)-normalised MSEs of the official code
(hsae's trainer normalises inputs to mean norm sqrt(d) instead).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.base import AutogradStep, SAEOutput, StepContext, TrainStep
from hsae.models.codes import SparseCodes
from hsae.models.partition import bounds_from_fractions, group_of_latents
from hsae.models.registry import register
from hsae.models.sparse.ops import sparse_decode
from hsae.models.topk import TopKConfig, TopKSAE


@dataclass
class TreeConfig(TopKConfig):
    layer_fractions: list[float] = field(default_factory=lambda: [0.25, 0.75])
    # TopK's weight 1 did not help this family (docs/hierarchy.md, "AuxK's weight"): the paper's value.
    aux_coef: float = 1 / 32
    aux_coef_children: float = 1 / 32
    # AuxK of a child layer only draws on dead latents whose parent fired in that row (after
    # gating), so a dead child learns its own parent's residual ("dead children learn to
    # reconstruct their parents' error"); only matters when aux_coef_children > 0.
    aux_gated: bool = True
    # "gate": the paper's raw TopK over the whole dictionary, then the activation-condition gate
    # (realised L0 <= k). "pool": TopK over a candidate pool that grows as parents are picked: k
    # greedy picks, each the largest pre-activation among latents whose parent is the root or was
    # already picked in that row (realised L0 = k, up to zero values; same activation condition).
    selection: str = "pool"
    realloc: bool = True
    # Co-activation re-parenting (ours, not in the paper): at every reallocation event and at
    # `realloc_stop`, each live child latent moves to the earlier-layer latent that fired most often
    # in the same rows since the last event, when that coverage P(parent on | child on) is at least
    # `reparent_min_coverage` and beats its current parent's; children reset to the root at
    # `realloc_stop` are then re-attached the same way. Counts are kept sparse (pairs that co-fire).
    reparent: bool = True
    reparent_min_coverage: float = 0.5
    # "batch": the official code's capacity (each step's loss split equally among the parents that
    # fired in the batch). "row": each row's own squared error split among the parents active in
    # that row (plus the root), so parents whose rows are poorly reconstructed get more children.
    capacity_mode: str = "row"
    realloc_first: float = 0.03
    realloc_max: float = 0.10
    realloc_stop: float = 0.51

    def validate(self) -> None:
        super().validate()
        if not self.layer_fractions or any(f <= 0 for f in self.layer_fractions):
            raise HsaeError("layer_fractions must be positive numbers, e.g. 0.25,0.75")
        if self.capacity_mode not in ("batch", "row"):
            raise HsaeError(f"capacity_mode must be 'batch' or 'row', got {self.capacity_mode!r}")
        if not 0 <= self.reparent_min_coverage <= 1:
            raise HsaeError(f"tree: reparent_min_coverage must be in [0, 1], got {self.reparent_min_coverage}")
        if not self.aux_coef_children >= 0:
            raise HsaeError(f"tree: aux_coef_children must be >= 0, got {self.aux_coef_children}")
        for name in ("realloc_first", "realloc_max", "realloc_stop"):
            if not 0 < getattr(self, name) <= 1:
                raise HsaeError(f"tree: {name} (a fraction of the run) must be in (0, 1], got {getattr(self, name)}")
        if self.selection not in ("gate", "pool"):
            raise HsaeError(f"selection must be 'gate' or 'pool', got {self.selection!r}")
        b = self.layer_bounds()
        if len(b) != len(self.layer_fractions) + 1:
            raise HsaeError(f"layer_fractions {self.layer_fractions} leave a layer empty at n_latents {self.n_latents}")

    def layer_bounds(self) -> list[int]:
        return bounds_from_fractions(self.n_latents, self.layer_fractions)


def gate_codes(idx: Tensor, val: Tensor, parents: Tensor, layer: Tensor, n_layers: int) -> Tensor:
    """Zero the entries whose parent is not (itself, after gating) active in the same row."""
    par = parents[idx]  # (n, k)
    lay = layer[idx]
    on = val != 0
    keep = on & (par < 0)
    for lv in range(1, n_layers):
        # parent active: some kept entry of this row is the parent
        parent_on = ((idx[:, None, :] == par[:, :, None]) & keep[:, None, :]).any(-1)
        keep = keep | (on & (lay == lv) & parent_on)
    return val * keep


def pool_topk(pre: Tensor, k: int, parents: Tensor) -> tuple[Tensor, Tensor]:
    """k greedy picks per row, each the largest pre-activation among the latents whose parent is the
    root or an earlier pick of that row that fires (value > 0); returns (indices, relu'd values), both
    (n, k). A row with fewer than k eligible latents gets value 0 in its extra slots."""
    n, m = pre.shape
    eligible = (parents < 0).expand(n, m).clone()
    rows = torch.arange(n, device=pre.device)
    picked_idx, picked_val = [], []
    for _ in range(min(k, m)):
        any_left = eligible.any(-1)
        i = pre.masked_fill(~eligible, float("-inf")).argmax(dim=-1)
        value = torch.where(any_left, pre[rows, i], torch.zeros_like(pre[rows, i]))
        picked_idx.append(i)
        picked_val.append(value)
        # the pick's children join the pool, if it fires (relu > 0): an inactive parent opens none
        eligible = eligible | ((parents[None, :] == i[:, None]) & (value > 0)[:, None])
        eligible[rows, i] = False
    return torch.stack(picked_idx, 1), torch.stack(picked_val, 1).relu()


@register("tree")
class TreeSAE(TopKSAE[TreeConfig]):
    config_class = TreeConfig
    supports_k = True
    builtin_hierarchy = True
    # The gate and the per-layer losses are not what the fused TopK step computes.
    train_step: ClassVar[TrainStep] = AutogradStep()
    layer: Tensor
    capacity: Tensor
    next_realloc: Tensor
    realloc_interval: Tensor

    def __init__(self, config: TreeConfig):
        super().__init__(config)
        bounds = config.layer_bounds()
        self.register_buffer("layer", group_of_latents(bounds))
        # capacity[-1] is the root's
        self.register_buffer("capacity", torch.zeros(config.n_latents + 1))
        self.register_buffer("next_realloc", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("realloc_interval", torch.tensor(-1, dtype=torch.long))
        with torch.no_grad():
            for lv in range(1, len(bounds) - 1):
                lo, hi = bounds[lv], bounds[lv + 1]
                choice = torch.randint(-1, lo, (hi - lo,))
                self.parents[lo:hi] = choice
        # Re-parenting counts since the last event (`reparent`): sparse (child * m + parent) keys of
        # pairs that co-fired with their counts, and each latent's firing count; training state.
        self.coactivation: tuple[Tensor, Tensor] | None = None
        self.fire_count: Tensor | None = None
        # This step's per-row squared error, from forward to after_step (capacity_mode="row").
        self.row_error: Tensor | None = None

    def training_state(self) -> dict[str, Tensor]:
        state = {}
        if self.coactivation is not None:
            state["coactivation_keys"], state["coactivation_counts"] = self.coactivation
        if self.fire_count is not None:
            state["fire_count"] = self.fire_count
        return state

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        unknown = set(state) - {"coactivation_keys", "coactivation_counts", "fire_count"}
        if unknown:
            raise HsaeError(f"tree: unknown training state {sorted(unknown)} in the checkpoint")
        device = self.W_enc.device
        keys, counts = state.get("coactivation_keys"), state.get("coactivation_counts")
        self.coactivation = None if keys is None or counts is None else (keys.to(device), counts.to(device))
        fire_count = state.get("fire_count")
        self.fire_count = None if fire_count is None else fire_count.to(device)

    @property
    def n_layers(self) -> int:
        return len(self.config.layer_bounds()) - 1

    def set_hierarchy(self, parents: Tensor) -> None:
        raise HsaeError("the tree family has a built-in tree; its parents are learned, not set")

    def activate(self, pre: Tensor, k: int | None = None) -> SparseCodes:
        if self.config.selection == "pool":
            k = k or self.config.require_k()
            if not 0 < k <= self.n_latents:
                raise HsaeError(f"k must be between 1 and {self.n_latents}, got {k}")
            idx, val = pool_topk(pre, k, self.parents)
            return SparseCodes(idx, val, self.n_latents)
        codes = super().activate(pre, k)
        assert isinstance(codes, SparseCodes)  # TopK's codes
        val = gate_codes(codes.indices, codes.values, self.parents, self.layer, self.n_layers)
        return SparseCodes(codes.indices, val, self.n_latents)

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        cfg = self.config
        xn = self.scale_in(x)
        pre = self.pre_activations(xn)
        codes = self.activate(pre)
        idx, val = codes.indices, codes.values
        lay = self.layer[idx]
        xn_hat = self.b_dec.expand_as(xn)
        layer_losses, partial = [], []
        for lv in range(self.n_layers):
            xn_hat = xn_hat + sparse_decode(idx, val * (lay == lv), self.W_dec)
            partial.append(xn_hat)
            layer_losses.append((xn_hat - xn).pow(2).sum(-1).mean())
        losses = {"mse": layer_losses[-1]}
        if len(layer_losses) > 1:
            losses["layer_mse"] = torch.stack(layer_losses[:-1]).sum()
        if ctx is not None and ctx.dead_mask is not None:
            aux = pre.new_zeros(())
            for lv in range(self.n_layers):
                coef = cfg.aux_coef if lv == 0 else cfg.aux_coef_children
                dead = ctx.dead_mask & (self.layer == lv)
                n_dead = int(dead.sum())
                if coef == 0 or n_dead == 0:
                    continue
                residual = (xn - partial[lv]).detach()
                allowed = dead.expand_as(pre)
                if lv > 0 and cfg.aux_gated:
                    # a dead child may only reconstruct its parent's error: rows where its parent
                    # (after gating) fired, or any row for a child of the root
                    on = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, idx, val != 0)
                    par = self.parents
                    parent_on = torch.where(par >= 0, on[:, par.clamp_min(0)], True)
                    allowed = allowed & parent_on
                masked = pre.masked_fill(~allowed, float("-inf"))
                v, i = masked.topk(min(self.aux_k(), n_dead), dim=-1, sorted=False)
                v = torch.where(torch.isfinite(v), v.relu(), torch.zeros_like(v))
                aux = aux + coef * torch.nan_to_num((sparse_decode(i, v, self.W_dec) - residual).pow(2).sum(-1).mean())
            if aux.requires_grad:
                losses["auxk"] = aux
        if self.training and cfg.capacity_mode == "row":
            self.row_error = (xn_hat - xn).detach().pow(2).sum(-1)
        return SAEOutput(x_hat=xn_hat / cfg.input_scale, codes=codes, losses=losses)

    # ----- dynamic reallocation ------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, out: SAEOutput, ctx: StepContext) -> None:
        cfg = self.config
        if not cfg.realloc or self.n_layers < 2:
            return
        codes = out.codes
        assert isinstance(codes, SparseCodes)  # this family's codes are (n, k) TopK entries
        on = codes.values != 0
        can_parent = torch.cat([self.layer < self.n_layers - 1, self.layer.new_ones(1, dtype=torch.bool)])
        if cfg.capacity_mode == "row" and self.row_error is not None:
            err = self.row_error
            self.row_error = None
            idx = torch.where(on & can_parent[codes.indices], codes.indices, self.n_latents)  # n_latents: the root
            keep = idx < self.n_latents
            n_par = keep.sum(-1) + 1
            share = (err / n_par)[:, None].expand_as(idx)
            self.capacity.index_put_((idx[keep],), share[keep], accumulate=True)
            self.capacity[-1] += float(share[:, 0].sum())
        else:
            fired = torch.zeros(self.n_latents + 1, dtype=torch.bool, device=self.capacity.device)
            fired[codes.indices[on]] = True
            fired[-1] = True
            candidates = fired & can_parent
            self.capacity[candidates] += float(out.loss.detach()) / int(candidates.sum())
        if cfg.reparent:
            self._count_coactivation(codes.indices, on)
        total = ctx.total_steps
        if int(self.next_realloc) < 0:
            self.realloc_interval.fill_(max(1, round(cfg.realloc_first * total)))
            self.next_realloc.fill_(int(self.realloc_interval))
        done = ctx.step + 1
        stop = round(cfg.realloc_stop * total)
        if done == stop and ctx.dead_mask is not None:
            if cfg.reparent:
                self.reparent(ctx.dead_mask)
            self.parents[ctx.dead_mask & (self.layer > 0)] = -1
            return
        if done != int(self.next_realloc) or done > stop:
            return
        if cfg.reparent and ctx.dead_mask is not None:
            self.reparent(ctx.dead_mask)
        if ctx.dead_mask is not None:
            self.reallocate(ctx.dead_mask)
        self.capacity.zero_()
        nxt = min(int(self.realloc_interval) * 2, max(1, round(cfg.realloc_max * total)))
        self.realloc_interval.fill_(nxt)
        self.next_realloc.fill_(done + nxt)

    def _count_coactivation(self, idx: Tensor, on: Tensor) -> None:
        """Accumulate, sparsely, how often each (child, earlier-layer latent) pair fires in one row,
        and how often each latent fires."""
        m = self.n_latents
        counts = self.fire_count
        if counts is None or counts.device != idx.device:
            counts = torch.zeros(m, device=idx.device)
        counts.index_put_((idx[on],), torch.ones(int(on.sum()), device=idx.device), accumulate=True)
        self.fire_count = counts
        lay = self.layer[idx]
        pair = on[:, :, None] & on[:, None, :] & (lay[:, :, None] > lay[:, None, :])  # [row, child, parent]
        keys = (idx[:, :, None] * m + idx[:, None, :])[pair]
        if keys.numel() == 0:
            return
        uk, cnt = keys.unique(return_counts=True)
        prev = self.coactivation
        if prev is not None and prev[0].device == uk.device:
            uk = torch.cat([prev[0], uk])
            cnt = torch.cat([prev[1], cnt])
            uk, inv = uk.unique(return_inverse=True)
            cnt = torch.zeros(uk.numel(), dtype=cnt.dtype, device=uk.device).index_add_(0, inv, cnt)
        self.coactivation = (uk, cnt)

    @torch.no_grad()
    def reparent(self, dead: Tensor) -> None:
        """Move each live child to the earlier-layer latent it co-fired with most (see the config)."""
        cfg = self.config
        coact, counts = self.coactivation, self.fire_count
        self.coactivation, self.fire_count = None, None
        if coact is None or counts is None:
            return
        m = self.n_latents
        keys, cnt = coact
        child, par = keys // m, keys % m
        cov = cnt.float() / counts[child].clamp_min(1)
        # current parent's coverage wins ties
        current = self.parents[child] == par
        score = cov + 1e-6 * current
        top = torch.full((m,), -1.0, device=keys.device).scatter_reduce(0, child, score, "amax")
        winner = score == top[child]
        best = torch.full((m,), -1, dtype=torch.long, device=keys.device)
        best.scatter_(0, child[winner], par[winner])  # exact ties between other parents: any one
        best_cov = torch.zeros(m, device=keys.device).scatter_(0, child[winner], cov[winner])
        seen = torch.zeros(m, dtype=torch.bool, device=keys.device)
        seen[child] = True
        move = seen & ~dead.to(seen.device) & (best_cov >= cfg.reparent_min_coverage) & (self.layer > 0)
        move &= best != self.parents
        # a parent must not be dead itself
        move &= ~dead.to(seen.device)[best.clamp_min(0)]
        self.parents[move] = best[move]

    @torch.no_grad()
    def reallocate(self, dead: Tensor) -> None:
        bounds = self.config.layer_bounds()
        cap = self.capacity.cpu()
        dead = dead.cpu()
        parents = self.parents.cpu().clone()
        for lv in range(1, self.n_layers):
            lo, hi = bounds[lv], bounds[lv + 1]
            cands = [p for p in range(lo) if not dead[p]] + [-1]
            c_of = {p: float(cap[p]) for p in cands}
            # greedy: maximise min_p C_p / k_p
            target = {p: 0 for p in cands}
            heap = [(-c_of[p], p) for p in cands]
            heapq.heapify(heap)
            for _ in range(hi - lo):
                _, p = heapq.heappop(heap)
                target[p] += 1
                heapq.heappush(heap, (-c_of[p] / (target[p] + 1), p))
            kids = parents[lo:hi]
            count = {p: 0 for p in cands}
            for p in kids.tolist():
                if p in count:
                    count[p] += 1
            free = []
            for j in range(lo, hi):
                p = int(parents[j])
                if not dead[j]:
                    continue
                if p not in count:  # parent no longer a live candidate
                    free.append(j)
                elif count[p] > target[p]:
                    count[p] -= 1
                    free.append(j)
            under = [p for p in cands if count[p] < target[p]]
            for p in under:
                while count[p] < target[p] and free:
                    parents[free.pop()] = p
                    count[p] += 1
        self.parents.copy_(parents.to(self.parents.device))


__all__ = ["TreeConfig", "TreeSAE", "gate_codes"]
