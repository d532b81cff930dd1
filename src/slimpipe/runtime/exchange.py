"""The attention context exchange at run time: roles from the schedule's markers, per-layer hooks, and the
exchange channel (docs/exchange.md; the pairing is slimpipe.schedule.exchange).

For each exchanged unit a rank is the **owner** (the longer K/V prefix) or the **helper**, in the forward
(``XOWN_F``/``XHELP_F`` before its F), the backward (``XOWN_B``/``XHELP_B`` before its B), or both. The F of
a unit with a role installs an AttentionHook (runtime/ports.py) on its K/V slice context, so every layer's
attention of that unit goes through :meth:`_UnitHooks.attend`:

* owner (forward or backward): the slice attention (slice_attention.SliceAttention) with a partner on
  its Window — forward: isend q and the K/V blocks of the earliest ``volume`` slices to the partner,
  compute the other blocks locally, merge the returned (out, lse); backward: isend dout, q, out, lse and
  those blocks, compute the local blocks' gradients, add the returned dq share and hand the returned
  dk, dv down block by block like any prefix gradient.
* forward helper: after its own layer-i attention, receive the owner's layer-i request, compute the block
  without a mask, send (out, lse) back — inside its own F, so the work overlaps instead of serialising.
* backward helper: an identity node on its attention output whose backward serves the owner's layer-i
  request inside its own B (after the layer's MLP backward, before its own attention backward).

Both ranks walk their layers in the same order and every request is answered before the next layer, so
the exchange cannot deadlock once both units started; that both start is what the schedule's rendezvous
check (dry run) proves. Messages travel on their own process group (``ParallelState.exchange_group``), in
the order the validated schedule fixes for each pair of ranks, so nothing depends on tags.

The local runtime runs ranks one action at a time, so the owner cannot wait inside a layer for a helper
that is not running: there the owner computes the moved block itself (the same ``block_forward`` /
``block_backward`` math) and helpers do nothing. Gradients are identical; only the distributed runtime
moves the work.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimpipe.config import ConfigError
from slimpipe.runtime.block_attention import block_backward, block_forward, lse_dtype
from slimpipe.runtime.exchange_attention import ServeBackward
from slimpipe.runtime.kv import SliceKV
from slimpipe.runtime.ports import AttentionHook
from slimpipe.runtime.slice_attention import Window
from slimpipe.schedule.actions import EXCHANGE_KINDS, Action, Kind, Schedule
from slimpipe.schedule.exchange import add_exchange, exchanges, has_exchange

__all__ = [
    "Role", "RankExchange", "DistChannel", "rank_roles", "with_exchange", "dist_exchange", "local_exchange",
]

Unit = tuple[int, int, int]  # (stage, micro-batch, slice)
_MARKER = {(Kind.F, True): Kind.XOWN_F, (Kind.F, False): Kind.XHELP_F,
           (Kind.B, True): Kind.XOWN_B, (Kind.B, False): Kind.XHELP_B}


@dataclass(frozen=True, kw_only=True, slots=True)
class Role:
    """This rank's part in one exchange."""

    owner: bool
    """True: this unit hands attention over; False: it computes the partner's."""
    partner: int
    """Pipeline rank of the partner."""
    partner_unit: Action
    """The partner's concurrent F or B."""
    volume: int
    """Slices of the owner's prefix (its earliest) whose attention moves."""

    def marker(self) -> Action:
        """The marker that must run before this rank's unit."""
        p = self.partner_unit
        return Action(p.stage, _MARKER[(p.kind, self.owner)], p.microbatch, p.seq_slice)


def rank_roles(schedule: Schedule, rank: int) -> dict[tuple[Kind, Unit], Role]:
    """(F or B, unit) -> Role for every exchanged unit of ``rank``."""
    roles: dict[tuple[Kind, Unit], Role] = {}
    for x in exchanges(schedule):
        if x.owner_rank == rank:
            roles[(x.owner.kind, x.owner.unit)] = Role(owner=True, partner=x.helper_rank,
                                                       partner_unit=x.helper, volume=x.volume)
        if x.helper_rank == rank:
            roles[(x.helper.kind, x.helper.unit)] = Role(owner=False, partner=x.owner_rank,
                                                         partner_unit=x.owner, volume=x.volume)
    return roles


def with_exchange(schedule: Schedule, attn_balance: int) -> Schedule:
    """The schedule a runtime runs: markers added (add_exchange) when attn_balance > 0 and it has none.

    A schedule that already carries markers is run as it is; a different nonzero attn_balance is an error.
    """
    if has_exchange(schedule):
        given = schedule.meta.attn_balance
        if attn_balance and attn_balance != given:
            raise ConfigError(f"attn_balance={attn_balance} but the schedule already carries exchange "
                              f"markers for attn_balance={given}: pass attn_balance=0 or the unmarked "
                              "schedule")
        return schedule
    return add_exchange(schedule, attn_balance) if attn_balance else schedule


class DistChannel:
    """isend / blocking irecv on the exchange process group (one order per pair of ranks, no tags)."""

    def __init__(self, group: object, global_rank: Callable[[int], int], device: torch.device) -> None:
        self.group, self.global_rank, self.device = group, global_rank, device
        self._pending: list[tuple[object, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()  # gloo raises on strided tensors and the peer then hangs
        work = dist.isend(tensor, dst=self.global_rank(dst), group=self.group)
        self._pending.append((work, tensor))
        self._pending = [(w, t) for w, t in self._pending
                         if not w.is_completed()]  # type: ignore[attr-defined]

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.irecv(buf, src=self.global_rank(src), group=self.group).wait()
        return buf

    def finish(self) -> None:
        for work, _ in self._pending:
            work.wait()  # type: ignore[attr-defined]
        self._pending.clear()


def _flat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, *shapes: torch.Size) -> list[torch.Tensor]:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes)]


class _Done:
    """An already available reply (the local runtime computes the moved block in place)."""

    def __init__(self, *values: torch.Tensor) -> None:
        self.values = values

    def wait(self) -> tuple[torch.Tensor, ...]:
        return self.values


class _Reply:
    """A reply the partner will send: received (blocking) on wait(), the wait timed."""

    def __init__(self, rx: RankExchange, src: int, shapes: list[tuple[torch.Size, torch.dtype]],
                 split: list[torch.Size] | None = None) -> None:
        self.rx, self.src, self.shapes, self.split = rx, src, shapes, split

    def wait(self) -> tuple[torch.Tensor, ...]:
        t0 = time.perf_counter()
        assert self.rx.channel is not None
        got = [self.rx.channel.recv(tuple(s), d, self.src) for s, d in self.shapes]
        self.rx.wait_s += time.perf_counter() - t0
        return tuple(_split(got[0], *self.split)) if self.split else tuple(got)


class _Peer:
    """Peer (exchange_attention) of an owner: over the channel, or computed in place (channel None)."""

    def __init__(self, rx: RankExchange, partner: int) -> None:
        self.rx, self.partner = rx, partner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.rx.sent += 1
        if self.rx.channel is None:
            return _Done(*block_forward(q, k, v, None))
        self.rx.channel.send(_flat(q, k, v), self.partner)
        return _Reply(self.rx, self.partner, [(q.shape, q.dtype), (q.shape[:-1], lse_dtype(q.dtype))])

    def backward(self, dout, q, out, lse, k, v):
        self.rx.sent += 1
        if self.rx.channel is None:
            return _Done(*block_backward(dout, q, k, v, out, lse, None))
        self.rx.channel.send(_flat(dout, q, out, k, v), self.partner)
        self.rx.channel.send(lse, self.partner)
        n = q.numel() + k.numel() + v.numel()
        return _Reply(self.rx, self.partner, [(torch.Size([n]), q.dtype)], split=[q.shape, k.shape, v.shape])


class RankExchange:
    """One rank's exchange state: roles, marker handlers, hooks; ``channel`` None = local runtime."""

    def __init__(self, schedule: Schedule, rank: int, channel: DistChannel | None, *,
                 replays_attention: bool = False) -> None:
        self.rank, self.channel = rank, channel
        # Full recompute replays attention in the backward: an owner's replay trades with its backward
        # partner first (forward request at the backward's volume), then the backward request.
        self.replays_attention = replays_attention
        self.roles = rank_roles(schedule, rank)
        self.bounds: list[int] = []
        self._armed: set[Action] = set()
        self.wait_s = 0.0  # time blocked on the partner (owner: replies; helper: requests), per step
        self.sent = self.served = 0  # blocks handed to partners / computed for partners, per step

    def handlers(self) -> dict[Kind, Callable[[Action], None]]:
        return {k: self._arm for k in EXCHANGE_KINDS}

    def begin_step(self, bounds: list[int]) -> None:
        self.bounds, self.wait_s = bounds, 0.0
        self.sent = self.served = 0
        self._armed.clear()

    def end_step(self) -> None:
        if self._armed:
            raise RuntimeError(f"exchange markers whose unit never ran: {sorted(map(str, self._armed))}")
        if self.channel is not None:
            self.channel.finish()

    def _arm(self, a: Action) -> None:
        self._armed.add(a)

    def _consume(self, kind: Kind, a: Action) -> Role | None:
        role = self.roles.get((kind, a.unit))
        if role is not None:
            marker = role.marker()
            if marker not in self._armed:
                raise RuntimeError(f"{a} is exchanged but its marker {marker} did not run before it")
            self._armed.discard(marker)
        return role

    def on_forward(self, a: Action, slice_kv: SliceKV) -> AttentionHook | None:
        """Before F(a): the per-layer attention hook if the unit has a forward or backward role."""
        f_role = self._consume(Kind.F, a)
        b_role = self.roles.get((Kind.B, a.unit))
        if f_role is None and b_role is None:
            return None
        return _UnitHooks(self, slice_kv, f_role, b_role)

    def on_backward(self, a: Action) -> None:
        """Before B(a): its marker must have run (the work itself was wired by the F's hook)."""
        self._consume(Kind.B, a)

    # ---- helper side ---------------------------------------------------------------------------------
    def _request_shapes(self, role: Role, q: torch.Tensor, k: torch.Tensor,
                        c: int = 1) -> tuple[torch.Size, torch.Size]:
        """(owner's grouped q, moved K/V) shapes; layers share one attention layout (same model config).
        ``bounds`` are this rank's rows; with context parallelism (c > 1) the owner's queries are the
        slice's c·(local rows), gathered over CP."""
        b, _, heads, d = q.shape
        hk, j = k.size(2), role.partner_unit.seq_slice
        t_o = (self.bounds[j + 1] - self.bounds[j]) * c
        return torch.Size([b, hk, heads // hk * t_o, d]), torch.Size([b, hk, self.bounds[role.volume], d])

    def serve_forward(self, role: Role, qs: torch.Size, ks: torch.Size, dtype: torch.dtype) -> None:
        """Compute the owner's forward block (its own forward, or the replay inside its backward)."""
        assert self.channel is not None
        with torch.no_grad():
            t0 = time.perf_counter()
            msg = self.channel.recv((qs.numel() + 2 * ks.numel(),), dtype, role.partner)
            self.wait_s += time.perf_counter() - t0
            oq, ok, ov = _split(msg, qs, ks, ks)
            out, lse = block_forward(oq, ok, ov, None)
            self.served += 1
            self.channel.send(out, role.partner)
            self.channel.send(lse, role.partner)

    def serve_backward(self, role: Role, qs: torch.Size, ks: torch.Size, dtype: torch.dtype) -> None:
        assert self.channel is not None
        with torch.no_grad():
            t0 = time.perf_counter()
            msg = self.channel.recv((3 * qs.numel() + 2 * ks.numel(),), dtype, role.partner)
            lse = self.channel.recv(tuple(qs[:-1]), lse_dtype(dtype), role.partner)
            self.wait_s += time.perf_counter() - t0
            dout, oq, out, ok, ov = _split(msg, qs, qs, qs, ks, ks)
            self.served += 1
            self.channel.send(_flat(*block_backward(dout, oq, ok, ov, out, lse, None)), role.partner)

    def serve_replay_and_backward(self, role: Role, qs: torch.Size, ks: torch.Size, dtype: torch.dtype) -> None:
        """The owner replays its attention (full recompute) before it asks for the backward block."""
        self.serve_forward(role, qs, ks, dtype)
        self.serve_backward(role, qs, ks, dtype)


class _UnitHooks:
    """The AttentionHook of one exchanged unit: every layer's attention goes through attend()."""

    def __init__(self, rx: RankExchange, slice_kv: SliceKV, f_role: Role | None, b_role: Role | None) -> None:
        self.rx, self.slice_kv, self.f_role, self.b_role = rx, slice_kv, f_role, b_role

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: Window) -> torch.Tensor:
        """Every layer's attention of the unit: an owner names its partner and volume on the window (the
        earliest blocks go to the partner); during a recompute replay (``slice_kv.replaying``, inside the
        unit's backward) the forward partner is not involved: the replay trades with the backward partner
        at the backward's volume, and no request is served."""
        rx, sk, fr, br = self.rx, self.slice_kv, self.f_role, self.b_role
        replay = sk.replaying
        fo = fr if fr is not None and fr.owner else None
        bo = br if br is not None and br.owner else None
        if replay:
            fo = bo
        if fo is not None:
            window.fwd_peer, window.fwd_volume = _Peer(rx, fo.partner), fo.volume
        if bo is not None:
            window.bwd_peer, window.bwd_volume = _Peer(rx, bo.partner), bo.volume
        out = sk.local_attention(q, k, v, window)  # under CP: the CP group's attention with these partners
        if replay or rx.channel is None:
            return out
        c = 1 if sk.store.cp is None else sk.store.cp.size  # query-out sends the slice's gathered queries
        if fr is not None and not fr.owner:
            rx.serve_forward(fr, *rx._request_shapes(fr, q, k, c), q.dtype)
        if br is not None and not br.owner:
            serve = rx.serve_replay_and_backward if rx.replays_attention else rx.serve_backward
            qs, ks = rx._request_shapes(br, q, k, c)
            out = ServeBackward.apply(out, functools.partial(serve, br, qs, ks, q.dtype))
        return out


def dist_exchange(schedule: Schedule, state, *,  # state: ParallelState
                  replays_attention: bool = False) -> RankExchange | None:
    """This process's exchange over ``state.exchange_group``, or None when the schedule has no markers.
    ``replays_attention``: the run recomputes whole blocks (attention replayed in the backward)."""
    if not has_exchange(schedule):
        return None
    return RankExchange(schedule, state.pp_rank, DistChannel(state.exchange_group, state.global_rank,
                                                             state.device), replays_attention=replays_attention)


def local_exchange(schedule: Schedule, rank: int) -> RankExchange | None:
    """Rank ``rank`` of a LocalPipelineRuntime (owners compute moved blocks themselves), or None."""
    return RankExchange(schedule, rank, None) if has_exchange(schedule) else None
