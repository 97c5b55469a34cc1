"""TREAD token routing, shared by every backbone.

A route ``(start, end, ratio)`` lets exactly floor(N * ratio) of the N routable tokens skip blocks
``start..end`` (inclusive). Just before block ``start`` each sample draws its own uniformly random
subset of tokens to keep; the blocks of the route see only those; just after block ``end`` the
processed tokens are scattered back into a copy of the sequence as it was at the route start, so the
bypassed tokens re-enter unchanged. Tokens that are not image tokens (time/class/padding tokens) are
never routed.

A backbone drives one :class:`RoutingPass` per forward::

    routing = self.router.begin(routable=grid_positions, training=self.training)
    for i, block in enumerate(self.blocks):
        x = routing.enter(i, x)                      # route start: keep a random subset
        x = block(x, c, scan=routing.scan(order_i))  # scan layers read survivors in their own order
        x = routing.exit(i, x)                       # route end: bypassed tokens re-enter

For scan-based layers, ``routing.scan(order)`` keeps each layer's scan order for the survivors: the
layer's order restricted to the kept set (:func:`restrict_order`). With ``scan_consistent=False``
survivors are read in their random selection order instead (the ablation baseline).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from ssm_tread.scans import inverse_order


@dataclass(frozen=True)
class Route:
    """floor(N * ratio) of the N routable tokens, drawn uniformly per sample, bypass blocks ``start..end``
    (inclusive)."""

    start: int
    end: int
    ratio: float

    def num_kept(self, num_tokens: int) -> int:
        """K = N - floor(N * ratio): the number of routable tokens that go through the route."""
        return num_tokens - math.floor(num_tokens * self.ratio)


RouteSpec = Route | Mapping | Sequence


def _as_route(spec: RouteSpec, index: int) -> Route:
    if isinstance(spec, Route):
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"start", "end", "ratio"}
        missing = {"start", "end", "ratio"} - set(spec)
        if unknown or missing:
            raise ValueError(
                f"route {index} {dict(spec)!r}: expected keys start, end, ratio"
                + (f"; unknown {sorted(unknown)}" if unknown else "")
                + (f"; missing {sorted(missing)}" if missing else "")
            )
        return Route(int(spec["start"]), int(spec["end"]), float(spec["ratio"]))
    if isinstance(spec, Sequence) and len(spec) == 3:
        return Route(int(spec[0]), int(spec[1]), float(spec[2]))
    raise ValueError(f"route {index} {spec!r}: give a Route, a dict(start, end, ratio) or a 3-tuple")


def parse_routes(routes: Iterable[RouteSpec] | None, depth: int) -> tuple[Route, ...]:
    """Validate routes for a model of ``depth`` blocks; returns them sorted by start.

    Each route needs 0 <= start <= end < depth and 0 <= ratio < 1; routes may not overlap.
    """
    parsed = [_as_route(spec, i) for i, spec in enumerate(routes or ())]
    for i, route in enumerate(parsed):
        if not 0 <= route.start <= route.end < depth:
            raise ValueError(
                f"route {i} {route}: needs 0 <= start <= end < depth = {depth} (blocks are numbered from 0)"
            )
        if not 0.0 <= route.ratio < 1.0:
            raise ValueError(f"route {i} {route}: ratio is the share of tokens that bypass, needs 0 <= ratio < 1")
    parsed.sort(key=lambda r: r.start)
    for before, after in zip(parsed, parsed[1:]):
        if after.start <= before.end:
            raise ValueError(f"routes {before} and {after} overlap: block {after.start} would be in both")
    return tuple(parsed)


def select_tokens(
    batch: int, num_tokens: int, num_keep: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each sample's independent, uniformly random subset of ``num_keep`` of ``num_tokens`` indices.

    Returns LongTensor[batch, num_keep] in random selection order.
    """
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(batch, num_tokens, generator=generator, device=gen_device).to(device)
    return scores.argsort(dim=1)[:, :num_keep]


def scan_permutation(order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The permutation of the kept axis that reads kept tokens in ``order`` restricted to them.

    order: LongTensor[L], a scan order over sequence positions; keep: LongTensor[B, K] of kept
    positions. Returns ``to_scan`` [B, K] with ``keep.gather(1, to_scan) == restrict_order(order, keep)``.
    """
    rank = inverse_order(order)
    return rank[keep].argsort(dim=1)


def restrict_order(order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each sample's kept positions sorted by the step at which ``order`` visits them. [B, K]."""
    return keep.gather(1, scan_permutation(order, keep))


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], index [B, K] -> [B, K, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ScanIndex:
    """How one layer reads the tokens in front of it: ``apply`` puts them in scan order, ``restore`` back.

    ``to_scan`` is LongTensor[L] (the same order for the whole batch), LongTensor[B, K] (a per-sample
    restricted order) or None (read the tokens as they lie).
    """

    def __init__(self, to_scan: torch.Tensor | None):
        self.to_scan = to_scan
        self.from_scan = None if to_scan is None else to_scan.argsort(dim=-1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._permute(x, self.to_scan)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        return self._permute(y, self.from_scan)

    @staticmethod
    def _permute(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            return x
        if index.dim() == 1:
            return x.index_select(1, index)
        return _gather_tokens(x, index)


class RouteState:
    """One route in flight: the sequence saved at its start and each sample's kept positions."""

    def __init__(self, route: Route, saved: torch.Tensor, keep: torch.Tensor):
        self.route = route
        self.saved = saved  # [B, L, D]
        self.keep = keep  # [B, K]: sequence positions of the kept tokens, in selection order

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Full sequence [B, L, D] -> kept tokens [B, K, D]."""
        return _gather_tokens(x, self.keep)

    def scatter(self, x_kept: torch.Tensor) -> torch.Tensor:
        """Kept tokens [B, K, D] back into the route-start sequence: bypassed tokens come back unchanged."""
        index = self.keep.unsqueeze(-1).expand(-1, -1, x_kept.shape[-1])
        return self.saved.scatter(1, index, x_kept.to(self.saved.dtype))

    def kept_mask(self) -> torch.Tensor:
        """BoolTensor[B, L]: True where a token went through the route."""
        mask = torch.zeros(self.saved.shape[:2], dtype=torch.bool, device=self.keep.device)
        return mask.scatter(1, self.keep, True)


class RoutingPass:
    """The routing state of one forward pass; see the module docstring for the loop that drives it."""

    def __init__(self, router: "TokenRouter", routable: torch.Tensor | None, enabled: bool, ratio: float | None):
        self.router = router
        self.routable = routable
        self.enabled = enabled and bool(router.routes)
        self.ratio = ratio
        self.starts = {r.start: r for r in router.routes}
        self.ends = {r.end for r in router.routes}
        self.current: RouteState | None = None
        self.finished: list[RouteState] = []
        # scan orders -> how the current tokens read them; see scan()
        self._scan_cache: dict[tuple, tuple[torch.Tensor, ScanIndex]] = {}

    def enter(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Before block ``block``: at a route start, save ``x`` [B, L, D] and return the kept tokens."""
        route = self.starts.get(block) if self.enabled else None
        if route is None:
            return x
        if self.ratio is not None:
            route = Route(route.start, route.end, self.ratio)
        batch, length, _ = x.shape
        routable = self.routable if self.routable is not None else torch.arange(length, device=x.device)
        chosen = select_tokens(batch, routable.numel(), route.num_kept(routable.numel()), x.device, self.router.generator)
        keep = routable[chosen]
        if routable.numel() < length:
            is_fixed = torch.ones(length, dtype=torch.bool, device=x.device)
            is_fixed[routable] = False
            # The fixed positions, ascending, without a data-dependent shape (so it runs on "meta" too).
            fixed = is_fixed.long().argsort(descending=True, stable=True)[: length - routable.numel()].sort().values
            keep = torch.cat([fixed.expand(batch, -1), keep], dim=1)
        self.current = RouteState(route, x, keep)
        self._scan_cache.clear()
        return self.current.gather(x)

    def exit(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """After block ``block``: at a route end, scatter the kept tokens back to full length."""
        if self.current is None or block != self.current.route.end:
            return x
        state, self.current = self.current, None
        self.finished.append(state)
        self._scan_cache.clear()
        return state.scatter(x)

    def after_route(self, block: int) -> bool:
        """True for the block right after a route of this pass ended (the one the reference TREAD runs in fp32)."""
        return self.enabled and block - 1 in self.ends

    def scan(self, order: torch.Tensor) -> ScanIndex:
        """How a layer whose scan order over the full sequence is ``order`` [L] reads the current tokens.

        Built once per order and token set (layers sharing an order share it), and cached by the order's
        memory, layout and version: the cache keeps each order alive, so no other tensor can take its memory
        while it is cached, and an order rewritten in place has a new version.
        """
        if self.current is not None and not self.router.scan_consistent:
            return ScanIndex(None)
        key = (order.data_ptr(), order.shape, order.stride(), order._version)
        if key not in self._scan_cache:
            to_scan = order if self.current is None else scan_permutation(order, self.current.keep)
            self._scan_cache[key] = (order, ScanIndex(to_scan))
        return self._scan_cache[key][1]

    def tag(self) -> RouteState | None:
        """Where the current tokens live: the route in flight, or None for the full sequence."""
        return self.current

    def align(self, x: torch.Tensor, tag: RouteState | None) -> torch.Tensor:
        """Bring ``x``, taken at ``tag`` (e.g. a long skip), to the current token set.

        A skip from inside a route is first brought back to full length over that route's start state.
        """
        if tag is self.current:
            return x
        full = x if tag is None else tag.scatter(x)
        return full if self.current is None else self.current.gather(full)

    def kept_masks(self) -> list[torch.Tensor]:
        """One BoolTensor[B, L] per finished route: True where the token went through it."""
        return [state.kept_mask() for state in self.finished]


class TokenRouter:
    """The routes of one model and how survivors are ordered; stateless between forward passes.

    Routing is a training-time device: it acts in training mode, and in evaluation only inside
    :meth:`forced`. ``generator`` (settable) makes the selections reproducible.
    """

    def __init__(self, routes: Iterable[RouteSpec] | None, depth: int, scan_consistent: bool = True):
        self.routes = parse_routes(routes, depth)
        self.depth = depth
        self.scan_consistent = scan_consistent
        self.generator: torch.Generator | None = None
        self._forced = False
        self._forced_ratio: float | None = None

    def begin(self, routable: torch.Tensor | None = None, training: bool = True) -> RoutingPass:
        """Start one forward pass. ``routable``: LongTensor of the sequence positions that may be routed
        (default: all)."""
        return RoutingPass(self, routable, training or self._forced, self._forced_ratio)

    @contextlib.contextmanager
    def forced(self, ratio: float | None = None) -> Iterator[None]:
        """Route also in evaluation mode, optionally at another ``ratio`` (routing guidance)."""
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"forced routing ratio must be in [0, 1), got {ratio}")
        previous = self._forced, self._forced_ratio
        self._forced, self._forced_ratio = True, ratio
        try:
            yield
        finally:
            self._forced, self._forced_ratio = previous

    def __repr__(self) -> str:
        return f"TokenRouter(routes={list(self.routes)}, scan_consistent={self.scan_consistent})"
