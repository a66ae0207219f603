"""Surgery: physically delete channels from an ONNX graph.

This module owns the rewrite. :class:`RemoveChannelsPass` takes the analysis' groups and, per
group, the channel indices to delete; it removes those positions from every slice of the
group (filters, biases, norm parameters, per-channel constants, consumer columns — C×H×W
column blocks after a Flatten) and shrinks every number that counts them (a depthwise Conv's
``group``, Reshape targets), then re-infers the shapes in between. The graph's inputs and
outputs never change. Whether the result is exact is decided by :mod:`sfp_onnx.runtime.verify`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from sfp_onnx.graph.groups import Analysis, ChannelGroup
from sfp_onnx.graph.load import infer_shapes

__all__ = ["RemoveChannelsPass", "rewrite_model"]


class RemoveChannelsPass(ir.passes.InPlacePass):
    """Delete channels of prunable groups from a model, in place.

    Cases handled, each a slice or count recorded by the analysis:
      1. filter rows, biases, norm parameters, per-channel constants: positions on their axis;
      2. consumer columns, in blocks of H×W after a Flatten and at segment offsets after a Concat,
         and per block of rows on a grouped Conv's input side;
      3. counts: a depthwise Conv's ``group`` attribute and entries of Reshape/Resize constants.
    """

    def __init__(self, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> None:
        super().__init__()
        self.analysis = analysis
        self.removed = {gid: np.asarray(idx, dtype=np.int64) for gid, idx in removed.items()}

    def requires(self, model: ir.Model) -> None:
        """Only prunable groups may lose channels, and never all of them."""
        for group in self.analysis.groups:
            chosen = self.removed.get(group.id)
            if chosen is None or chosen.size == 0:
                continue
            if not group.prunable:
                raise ir.passes.PreconditionError(f"group {group.id} is blocked: {group.blocked}")
            if np.unique(chosen).size >= group.channels or chosen.min() < 0:
                raise ir.passes.PreconditionError(f"group {group.id}: bad channel indices")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Apply all deletions, then re-infer the shapes of the tensors in between."""
        deletions: Deletions = defaultdict(set)
        count_changes: dict[tuple[str, str | None, str | None, int], int] = defaultdict(int)
        for group in self.analysis.groups:
            chosen = self.removed.get(group.id)
            if chosen is None or chosen.size == 0:
                continue
            _collect(group, np.unique(chosen), deletions, count_changes)
        if not deletions:
            return ir.passes.PassResult(model, modified=False)
        _delete_positions(model.graph, deletions)
        _shrink_counts(model.graph, count_changes)
        _forget_inner_shapes(model.graph)
        infer_shapes(model)
        return ir.passes.PassResult(model, modified=True)


# (tensor, axis) -> positions to delete; a grouped Conv's input side is keyed
# (tensor, axis, G) -> the conv's input channels to delete (see _delete_grouped_columns).
Deletions = dict[tuple, set[int]]


def _collect(
    group: ChannelGroup,
    chosen: np.ndarray,
    deletions: Deletions,
    count_changes: dict[tuple[str, str | None, str | None, int], int],
) -> None:
    for piece in group.slices:
        positions = piece.offset + (chosen[:, None] * piece.block + np.arange(piece.block))
        key = (piece.tensor, piece.axis)
        if piece.row_groups > 1:
            key = (piece.tensor, piece.axis, piece.row_groups)
        deletions[key].update(positions.reshape(-1).tolist())
    for count in group.counts:
        key = (count.node, count.attribute, count.tensor, count.position)
        count_changes[key] += chosen.size * count.per_channel


def _delete_positions(graph: ir.Graph, deletions: Mapping[tuple, set[int]]) -> None:
    by_tensor: dict[str, list[tuple[tuple, set[int]]]] = defaultdict(list)
    for (tensor, *where), positions in deletions.items():
        by_tensor[tensor].append((tuple(where), positions))
    for name, cuts in by_tensor.items():
        value = graph.initializers[name]
        array = value.const_value.numpy()
        # plain cuts first: a grouped input side needs the final rows of each block
        for where, positions in sorted(cuts, key=lambda cut: len(cut[0])):
            if len(where) == 1:
                array = np.delete(array, sorted(positions), axis=where[0] % array.ndim)
            else:
                array = _delete_grouped_columns(array, where[0], where[1], positions)
        _set_initializer(value, array)


def _delete_grouped_columns(
    array: np.ndarray, axis: int, row_groups: int, channels: set[int]
) -> np.ndarray:
    """Delete a grouped Conv's input ``channels`` from the row block of each one's group.

    ``axis`` holds the P input channels of one convolution group; input channel c is column
    c % P of the (c // P)-th of ``row_groups`` equal blocks of rows (axis 0). Every block
    loses the same number of columns (the analysis' equal-parts rule), so the result is
    again one array with ``row_groups`` blocks.
    """
    width = array.shape[axis]
    blocks = np.split(array, row_groups, axis=0)
    kept = []
    for part, block in enumerate(blocks):
        local = [c % width for c in channels if c // width == part]
        kept.append(np.delete(block, sorted(local), axis=axis))
    if len({block.shape for block in kept}) != 1:
        raise ValueError("grouped convolution input: groups would lose different counts")
    return np.concatenate(kept, axis=0)


def _set_initializer(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _shrink_counts(
    graph: ir.Graph, changes: Mapping[tuple[str, str | None, str | None, int], int]
) -> None:
    nodes = {node.name: node for node in graph}
    for (node_name, attribute, tensor, position), delta in changes.items():
        if attribute is not None:
            node = nodes[node_name]
            value = node.attributes[attribute].value
            if isinstance(value, int):
                node.attributes[attribute] = ir.AttrInt64(attribute, value - delta)
            else:  # one entry of a list (an opset-11 Split's sizes)
                entries = list(value)
                entries[position] -= delta
                node.attributes[attribute] = ir.AttrInt64s(attribute, entries)
        else:
            value = graph.initializers[tensor]
            array = value.const_value.numpy().copy()
            array.reshape(-1)[position] -= delta
            _set_initializer(value, array)


def _forget_inner_shapes(graph: ir.Graph) -> None:
    """Drop inferred shapes of intermediate tensors; the graph's interface keeps its own."""
    interface = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if value.name not in interface:
                value.shape = None


def rewrite_model(model: ir.Model, analysis: Analysis, removed: Mapping[int, np.ndarray]) -> bool:
    """Delete ``removed[group_id]`` channels from ``model`` in place; True if anything changed."""
    return RemoveChannelsPass(analysis, removed)(model).modified
