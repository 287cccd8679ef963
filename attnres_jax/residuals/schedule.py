"""Static block schedule of Block / Full AttnRes (docs/method.md §4).

Sublayer `l` (0-based, `L` in all, `K` per scanned transformer layer) starts a
block when `l % S == 0`; it then seals the running partial sum into slot
`l // S` of the source buffer (slot 0 holds the embedding `b_0`). After the
seal, sublayer `l` sees the sealed slots `0 .. l // S` and, unless it starts a
block, the partial sum. `S = 1` is Full AttnRes, with `N = L` slots.

Everything here is plain numpy computed at trace time: the scanned step reads
these tables as scan inputs, so the traced program does not grow with depth.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
  """Block layout of `num_layers` scanned layers of `sublayers_per_layer` sublayers."""

  num_layers: int
  sublayers_per_layer: int
  block_size: int

  @property
  def num_sublayers(self) -> int:
    return self.num_layers * self.sublayers_per_layer

  @property
  def num_slots(self) -> int:
    """N: sealed sources at the end, b_0 .. b_{N-1} (the last partial is extra)."""
    return -(-self.num_sublayers // self.block_size)

  def sublayer_index(self) -> np.ndarray:
    """[num_layers, K] global sublayer index l."""
    return np.arange(self.num_sublayers, dtype=np.int32).reshape(
        self.num_layers, self.sublayers_per_layer)

  def starts_block(self) -> np.ndarray:
    """[num_layers, K] bool: sublayer l seals the partial sum (l % S == 0)."""
    return self.sublayer_index() % self.block_size == 0

  def slot(self) -> np.ndarray:
    """[num_layers, K] int32: the newest sealed slot l // S, after l's seal."""
    return self.sublayer_index() // self.block_size

  def position_in_block(self) -> np.ndarray:
    """[num_layers, K] int32: l % S, the sublayer's row among its block's queries (two-phase, docs/method.md §6)."""
    return self.sublayer_index() % self.block_size

  def saved_partial_index(self) -> np.ndarray:
    """[num_layers] int32: where the partial entering each layer is stored, or -1.

    A layer whose first sublayer starts a block seals its entering partial into
    the buffer, so the backward pass reads it back from there; only the others
    are stored (none for Full AttnRes).
    """
    stored = ~self.starts_block()[:, 0]
    return np.where(stored, np.cumsum(stored) - 1, -1).astype(np.int32)

  @property
  def num_saved_partials(self) -> int:
    return int((~self.starts_block()[:, 0]).sum())

  def segments(self, count: int, *, two_phase: bool) -> tuple[tuple[int, int, int], ...]:
    """`count` runs of consecutive layers `(start, end, num_read)`, as equal as they divide.

    `num_read` is the number of leading slots any mix in the run reads (at
    least 1): every slot a sublayer sees (`slot` at a block start, else
    `slot + 1`; after the seal, `slot + 1`, for two-phase). A scan per run reads
    only those slots, so the depth loop reads about half of the buffer of Full
    AttnRes instead of all of it (docs/method.md §7). The last run reads every
    slot: cutting off the one that Full AttnRes's last sublayer does not see
    would copy the rest where the mix is a dot (float32 on CPUs).
    """
    slots_seen = self.slot() + (1 if two_phase else ~self.starts_block())
    bounds = np.linspace(0, self.num_layers, min(count, self.num_layers) + 1).round().astype(int)
    return tuple((int(start), int(end), self.num_slots if end == self.num_layers
                  else max(1, int(slots_seen[start:end].max())))
                 for start, end in zip(bounds[:-1], bounds[1:]))

