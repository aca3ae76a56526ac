"""The fast engine behind MaxBoxAcc/MaxBoxAccV2: every threshold of a map in one sweep.

The protocol (spec §2.2) binarises the uint8 map U at each threshold level t (`U > t`), runs
OpenCV's contour search (RETR_TREE, so hole contours count too) and keeps each contour's
boundingRect. Doing that per threshold costs one contour search per level. This module gets the
same boxes from one pass over the pixels, using two facts:

* The regions nest: `U > t` only grows as t falls. Adding pixels in decreasing order of U to a
  union-find with 8-connectivity yields, at every level, the 8-connected components of `U > t`.
  OpenCV gives exactly one outer contour per such component, and its boundingRect is the
  component's bounding box.
* The holes nest the other way: `U <= t` only grows as t rises. A union-find with 4-connectivity
  over those pixels yields the 4-connected background components; those that never touch the image
  edge are the holes, and OpenCV gives exactly one hole contour per hole. That contour runs through
  the foreground pixels 4-adjacent to the hole, so its boundingRect is the hole's bounding box
  grown by one pixel on each side.

MaxBoxAcc (v1) keeps only the contour with the largest `cv2.contourArea` (the polygon through the
contour's pixel centres). For a component without holes that area is exact from local counts:
each 2x2 block of pixels with all four corners in the component adds 1, with three corners 1/2,
otherwise 0. Holes (counted through the Euler number, also from 2x2 blocks) add area we do not
track, so for a component with holes we only know bounds. Where bounds or ties leave the largest
contour undecided, the level is handed back (NaN) and the caller runs the definition itself, with
OpenCV, for that level alone. The tests check all of this against OpenCV on random maps.

Speed: a new pixel reads its eight neighbours once, as an 8-bit mask; tables over the 256 masks
give the block counts' change and one neighbour per group of mutually adjacent ones (one find per
group, not per neighbour). The hole search, a second union-find, runs only over the boxes of
components whose holes could beat the level's best box (a box inside E has IoU at most
|E & G| / |G| with a GT box G), and boxes that cannot reach the smallest IoU threshold are never
evaluated.

Box convention (spec §2.2 step 7, kept as the reference does): boundingRect's x+w is one past the
last pixel, clipped to width-1, and the box is then used as inclusive.
"""
from __future__ import annotations

import numpy as np
from wsolbench.kernels import kernel

# A pixel's eight neighbours in ring order (bit k of its neighbourhood mask): N, NE, E, SE, S, SW,
# W, NW, as (row, column) offsets.
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
# The four 2x2 blocks that hold the pixel: the ring positions of their other three pixels, and the
# pixel's own corner bit in each (block corners as bits: top-left 1, top-right 2, bottom-left 4,
# bottom-right 8; the neighbours' bits listed in the same order as their ring positions).
_BLOCKS = (((7, 1), (0, 2), (6, 4), 8),   # the pixel is the bottom-right corner: NW, N, W
           ((0, 1), (1, 2), (2, 8), 4),   # bottom-left: N, NE, E
           ((6, 1), (5, 4), (4, 8), 2),   # top-right: W, SW, S
           ((2, 2), (4, 4), (3, 8), 1))   # top-left: E, S, SE
# Per 2x2 block: the doubled polygon area a hole-free component gets from it (2 per full block, 1
# per three-corner block), and its Euler number times 4 for 8-connectivity (Gray's bit-quads: +1
# per one-corner block, -1 per three-corner block, -2 per diagonal pair). A component's hole count
# is 1 - EULER4 / 4.
_AREA2 = (0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1, 2)
_EULER4 = (0, 1, 1, 0, 1, 0, -2, -1, 1, -2, 0, -1, 0, -1, -1, 0)


def _neighbourhood_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per 8-neighbourhood mask (256): what adding the pixel changes, read from the mask alone.

    groups/group_count: one present neighbour per group of present neighbours that are 8-adjacent
    to one another (through the ring, not through the pixel). Neighbours in one group are in one
    component already (each was united with its present neighbours when it was added), so the new
    pixel needs one find per group, not one per neighbour. area2/euler4: the change of the
    component's doubled area and 4x Euler number, summed over the pixel's four blocks.
    """
    groups = np.zeros((256, 4), dtype=np.int64)
    group_count = np.zeros(256, dtype=np.int64)
    area2 = np.zeros(256, dtype=np.int64)
    euler4 = np.zeros(256, dtype=np.int64)
    for mask in range(256):
        present = [k for k in range(8) if mask >> k & 1]
        label = {k: k for k in present}
        for a in present:
            for b in present:
                if a < b and max(abs(_RING[a][0] - _RING[b][0]), abs(_RING[a][1] - _RING[b][1])) == 1:
                    old, new = label[b], label[a]
                    label = {k: (new if v == old else v) for k, v in label.items()}
        representatives = sorted(set(label.values()))
        group_count[mask] = len(representatives)
        groups[mask, :len(representatives)] = representatives
        for block in _BLOCKS:
            neighbours, own = block[:3], block[3]
            old = sum(bit for position, bit in neighbours if mask >> position & 1)
            area2[mask] += _AREA2[old | own] - _AREA2[old]
            euler4[mask] += _EULER4[old | own] - _EULER4[old]
    return groups, group_count, area2, euler4


_GROUPS, _GROUP_COUNT, _AREA2_CHANGE, _EULER4_CHANGE = _neighbourhood_tables()

# The kernels index a copy of the map padded by one absent pixel on each side, so neighbours need
# no bounds checks, and the padding ring doubles as "outside" for the hole search.


@kernel()
def _find(parent, p):
    while parent[p] != p:  # path halving
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


@kernel()
def _intersection(x0, y0, x1, y1, gt, g):
    """Pixels shared by an inclusive box and ground-truth box g (spec §2.3: +1 per side)."""
    ix = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
    iy = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
    return max(0, ix) * max(0, iy)


@kernel()
def _max_iou(x0, y0, x1, y1, gt):
    """Max over ground-truth boxes of the protocol's IoU (spec §2.3: inclusive, +1 areas)."""
    best = 0.0
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for g in range(gt.shape[0]):
        inter = _intersection(x0, y0, x1, y1, gt, g)
        denominator = area + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
        iou = inter / denominator if denominator > 0 else 0.0
        if iou > best:
            best = iou
    return best


@kernel()
def _max_cover(x0, y0, x1, y1, gt):
    """Max over ground-truth boxes G of |box & G| / |G|: a bound on the IoU of any box inside."""
    best = 0.0
    for g in range(gt.shape[0]):
        area = (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1)
        cover = _intersection(x0, y0, x1, y1, gt, g) / area if area > 0 else 0.0
        if cover > best:
            best = cover
    return best


@kernel("i8(f8[:, ::1], u1[:, ::1])")
def quantize_into(scoremap, out):
    """out = uint8(S * 255), truncating (spec §2.2 step 1), as numpy's astype; returns max(out)."""
    height, width = scoremap.shape
    maximum = 0
    for r in range(height):
        for c in range(width):
            v = np.uint8(scoremap[r, c] * 255.0)
            out[r, c] = v
            if v > maximum:
                maximum = v
    return maximum


class Workspace:
    """Scratch arrays for `sweep_levels`, reused across the maps of one thread."""

    def __init__(self, height: int, width: int):
        n = (height + 2) * (width + 2)
        self.shape = (height, width)
        self.parent = np.full(n, -1, dtype=np.int32)
        self.size = np.zeros(n, dtype=np.int32)
        self.box = np.zeros((n, 4), dtype=np.int32)  # x0, y0, x1, y1 of the component, image frame
        self.area2 = np.zeros(n, dtype=np.int32)
        self.euler4 = np.zeros(n, dtype=np.int32)
        self.dirty = np.zeros(n, dtype=np.uint8)
        self.iou = np.zeros(n, dtype=np.float64)
        self.listed = np.zeros(n, dtype=np.int32)  # the components that can reach the IoU floor
        self.listed_at = np.full(n, -1, dtype=np.int32)
        self.order = np.zeros(height * width, dtype=np.int32)
        self.quantized = np.zeros((height, width), dtype=np.uint8)


def sweep_levels(quantized: np.ndarray, level_slot: np.ndarray, gt: np.ndarray, largest: bool = True,
                 workspace: Workspace | None = None, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU per threshold level, for all contours (V2) and the largest contour (v1).

    quantized: the uint8 map U (H, W), with max(U) > 0 (a map with max(U) == 0 has no contour at
    any level). level_slot[t] (length 256) is the output slot of level t, or -1 when no threshold
    maps to t. gt: int64 (G, 4) inclusive ground-truth boxes in the map's frame. Returns
    (best_all, best_largest), float64 per slot; best_largest is NaN where the largest contour is
    not decided by the counts (the caller then asks OpenCV), and all NaN unless `largest`.

    floor: only IoUs >= floor are needed exactly (the smallest IoU threshold asked for); a best
    below it may be reported as any value below it. Boxes too small to reach it (area below
    floor x the smallest GT area, since IoU <= |A| / |G|) are then never looked at, which is what
    keeps maps with thousands of specks cheap. v1 needs every component, so `largest` ignores it.
    """
    if workspace is None or workspace.shape != quantized.shape:
        workspace = Workspace(*quantized.shape)
    w = workspace
    n_slots = int(level_slot.max()) + 1
    best_all = np.full(n_slots, -1.0)
    best_largest = np.full(n_slots, np.nan)
    if n_slots == 0:
        return best_all, best_largest
    gt = np.ascontiguousarray(gt, dtype=np.int64)
    gt_areas = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    min_area = 0.0 if largest else float(floor) * float(gt_areas.min())
    _sweep(np.ascontiguousarray(quantized, dtype=np.uint8), level_slot.astype(np.int64), gt, largest, min_area,
           float(floor), best_all, best_largest, w.parent, w.size, w.box, w.area2, w.euler4, w.dirty, w.iou, w.listed,
           w.listed_at, w.order, _GROUPS, _GROUP_COUNT, _AREA2_CHANGE, _EULER4_CHANGE)
    return best_all, best_largest


@kernel()
def _merge(a, b, parent, size, box, area2, euler4, dirty, listed, listed_at, n_listed):
    """Merge root b into root a; returns the new length of the list (b leaves it if it was in)."""
    parent[b] = a
    size[a] += size[b]
    box[a, 0] = min(box[a, 0], box[b, 0])
    box[a, 1] = min(box[a, 1], box[b, 1])
    box[a, 2] = max(box[a, 2], box[b, 2])
    box[a, 3] = max(box[a, 3], box[b, 3])
    area2[a] += area2[b]
    euler4[a] += euler4[b]
    dirty[a] = 1
    k = listed_at[b]
    if k >= 0:
        n_listed -= 1
        last = listed[n_listed]
        listed[k] = last
        listed_at[last] = k
        listed_at[b] = -1
    return n_listed


@kernel()
def _new_component(p, r, c, parent, size, box):
    """Pixel p at (r, c) starts a component of its own."""
    parent[p] = p
    size[p] = 1
    box[p, 0] = c
    box[p, 1] = r
    box[p, 2] = c
    box[p, 3] = r


@kernel()
def _join(p, r, c, root, parent, size, box):
    """Pixel p at (r, c) joins the component of `root`."""
    parent[p] = root
    size[root] += 1
    box[root, 0] = min(box[root, 0], c)
    box[root, 1] = min(box[root, 1], r)
    box[root, 2] = max(box[root, 2], c)
    box[root, 3] = max(box[root, 3], r)


@kernel()
def _list_if_large(a, area, min_area, listed, listed_at, n_listed):
    """Add root a (not listed yet) once its evaluated box can reach the IoU floor (boxes only grow)."""
    if area >= min_area:
        listed[n_listed] = a
        listed_at[a] = n_listed
        n_listed += 1
    return n_listed


@kernel()
def _set_frame(parent, value, wp, x0, y0, x1, y1):
    """parent = value on the one-pixel frame around the region (x0, y0)-(x1, y1), padded indices."""
    top = y0 * wp + x0  # padded index of (y0 - 1, x0 - 1)
    bottom = (y1 + 2) * wp + x0  # of (y1 + 1, x0 - 1)
    for c in range(x1 - x0 + 3):
        parent[top + c] = value
        parent[bottom + c] = value
    for r in range(y0 + 1, y1 + 2):
        parent[r * wp + x0] = value
        parent[r * wp + x1 + 2] = value


@kernel("void(u1[:, ::1], i8[::1], i8[:, ::1], b1, f8, f8, f8[::1], f8[::1], i4[::1], i4[::1], i4[:, ::1], "
        "i4[::1], i4[::1], u1[::1], f8[::1], i4[::1], i4[::1], i4[::1], i8[:, ::1], i8[::1], i8[::1], i8[::1])")
def _sweep(quantized, level_slot, gt, largest, min_area, floor, best_all, best_largest,
           parent, size, box, area2, euler4, dirty, iou, listed, listed_at, order,
           groups, group_count, area2_change, euler4_change):
    height, width = quantized.shape
    wp = width + 2
    n = height * width
    lowest = 256
    highest = -1
    for t in range(256):
        if level_slot[t] >= 0:
            lowest = min(lowest, t)
            highest = max(highest, t)
    n_slots = best_all.shape[0]
    has_holes = np.zeros(n_slots, dtype=np.bool_)
    # The region the hole search needs: the union of the boxes of listed components whose holes
    # could beat their level's best box.
    region_x0, region_y0, region_x1, region_y1 = width, height, -1, -1

    # Pixels bucketed by value (a counting sort), as padded indices: value v is order[start[v]:start[v + 1]].
    start = np.zeros(257, dtype=np.int64)
    for r in range(height):
        for c in range(width):
            start[quantized[r, c] + 1] += 1
    for v in range(256):
        start[v + 1] += start[v]
    fill = start[:256].copy()
    maximum = 0
    for r in range(height):
        for c in range(width):
            v = quantized[r, c]
            order[fill[v]] = (r + 1) * wp + c + 1
            fill[v] += 1
            if v > maximum:
                maximum = v

    # Ring order, as in _RING: N, NE, E, SE, S, SW, W, NW.
    ring = np.array([-wp, -wp + 1, 1, wp + 1, wp, wp - 1, -1, -wp - 1])

    # ---- Foreground: 8-connected components of U > t, t falling. -------------------------------
    n_listed = 0
    n_components = 0
    euler4_total = 0
    for t in range(maximum - 1, lowest - 1, -1):
        for i in range(start[t + 1], start[t + 2]):
            p = order[i]
            r = p // wp - 1
            c = p - (r + 1) * wp - 1
            mask = 0
            for k in range(8):
                if parent[p + ring[k]] >= 0:
                    mask |= 1 << k
            n_groups = group_count[mask]
            if n_groups == 0:  # a new component
                root = p
                _new_component(p, r, c, parent, size, box)
                area2[p] = 0
                euler4[p] = 0
                n_components += 1
            else:  # joins its neighbours' components, which it unites
                root = _find(parent, p + ring[groups[mask, 0]])
                for j in range(1, n_groups):
                    other = _find(parent, p + ring[groups[mask, j]])
                    if other == root:
                        continue
                    if size[root] < size[other]:
                        root, other = other, root
                    n_listed = _merge(root, other, parent, size, box, area2, euler4, dirty, listed, listed_at,
                                      n_listed)
                    n_components -= 1
                _join(p, r, c, root, parent, size, box)
            # The 2x2 blocks with this pixel as a corner: their present pixels are all 8-adjacent
            # to it, so they belong to `root` now.
            area2[root] += area2_change[mask]
            euler4[root] += euler4_change[mask]
            euler4_total += euler4_change[mask]
            dirty[root] = 1
            if listed_at[root] < 0:
                area = ((min(box[root, 2] + 1, width - 1) - box[root, 0] + 1)
                        * (min(box[root, 3] + 1, height - 1) - box[root, 1] + 1))
                n_listed = _list_if_large(root, area, min_area, listed, listed_at, n_listed)
        slot = level_slot[t]
        if slot < 0:
            continue
        # Euler number = components - holes, summed over all components: no holes anywhere is the
        # common case, decided without looking at any component.
        any_holes = n_components * 4 != euler4_total
        best = -1.0
        # v1: the candidate with the largest certain (lower-bound) area must beat every other
        # candidate's possible (upper-bound) area, in doubled-area integers.
        top_lower = -1
        top_root = -1
        upper_first = -1
        upper_first_root = -1
        upper_second = -1
        for i in range(n_listed):
            a = listed[i]
            if dirty[a]:
                iou[a] = _max_iou(box[a, 0], box[a, 1], min(box[a, 2] + 1, width - 1),
                                  min(box[a, 3] + 1, height - 1), gt)
                dirty[a] = 0
            if iou[a] > best:
                best = iou[a]
            if largest:
                lower = area2[a]
                if euler4[a] == 4:
                    upper = lower
                else:  # holes: the polygon lies within the box of pixel centres
                    upper = 2 * (box[a, 2] - box[a, 0]) * (box[a, 3] - box[a, 1])
                if lower > top_lower:
                    top_lower = lower
                    top_root = a
                if upper > upper_first:
                    upper_second = upper_first
                    upper_first = upper
                    upper_first_root = a
                elif upper > upper_second:
                    upper_second = upper
        best_all[slot] = best
        if any_holes:
            # A hole's contour box lies inside its component's box E, so its IoU with a GT box G
            # is at most |E & G| / |G|. The hole search needs only the components whose holes
            # could beat this level's best and reach the floor, and covers their boxes only.
            for i in range(n_listed):
                a = listed[i]
                if euler4[a] == 4:
                    continue
                bound = _max_cover(box[a, 0], box[a, 1], min(box[a, 2] + 1, width - 1),
                                   min(box[a, 3] + 1, height - 1), gt)
                if bound > best and bound >= floor:
                    has_holes[slot] = True
                    region_x0 = min(region_x0, box[a, 0])
                    region_y0 = min(region_y0, box[a, 1])
                    region_x1 = max(region_x1, box[a, 2])
                    region_y1 = max(region_y1, box[a, 3])
        if largest:
            rival = upper_second if upper_first_root == top_root else upper_first
            # A hole contour can tie its own component's outer contour only if the component has
            # no solid area at all (a one-pixel-thin ring); leave that to OpenCV.
            thin_ring = euler4[top_root] != 4 and area2[top_root] == 0
            if top_lower > rival and not thin_ring:
                best_largest[slot] = iou[top_root]

    # Reset what the foreground sweep touched.
    for i in range(start[lowest + 1], n):
        p = order[i]
        parent[p] = -1
        listed_at[p] = -1

    # ---- Holes: 4-connected components of U <= t not connected to the outside, t rising. --------
    # Only up to the last level that has a hole at all (most smooth maps have none).
    last_hole_level = -1
    for t in range(highest, -1, -1):
        if level_slot[t] >= 0 and has_holes[level_slot[t]]:
            last_hole_level = t
            break
    if last_hole_level < 0:
        return
    # Every pixel outside the region counts as "outside": a hole lies strictly inside its
    # component's box, so it never touches them, and a background component that does touch them
    # is no hole of any listed component. One root stands for all of them, and the one-pixel frame
    # around the region points at it, so the region's pixels need no bounds checks.
    outside = 0  # a padding pixel: never one of the region's own pixels
    parent[outside] = outside
    size[outside] = (height + 2) * wp
    listed_at[outside] = -1
    _set_frame(parent, outside, wp, region_x0, region_y0, region_x1, region_y1)
    n_listed = 0
    for t in range(0, last_hole_level + 1):
        for i in range(start[t], start[t + 1]):
            p = order[i]
            r = p // wp - 1
            c = p - (r + 1) * wp - 1
            if r < region_y0 or r > region_y1 or c < region_x0 or c > region_x1:
                continue
            root = -1
            for k in range(0, 8, 2):  # N, E, S, W: 4-connectivity
                q = p + ring[k]
                if parent[q] < 0:
                    continue
                other = _find(parent, q)
                if root < 0:
                    root = other
                    continue
                if other == root:
                    continue
                if size[root] < size[other]:
                    root, other = other, root
                n_listed = _merge(root, other, parent, size, box, area2, euler4, dirty, listed, listed_at, n_listed)
            if root < 0:  # a new component
                root = p
                _new_component(p, r, c, parent, size, box)
            else:
                _join(p, r, c, root, parent, size, box)
            dirty[root] = 1
            if root != outside and listed_at[root] < 0:
                area = ((min(box[root, 2] + 2, width - 1) - box[root, 0] + 2)
                        * (min(box[root, 3] + 2, height - 1) - box[root, 1] + 2))
                n_listed = _list_if_large(root, area, min_area, listed, listed_at, n_listed)
        slot = level_slot[t]
        if slot < 0 or not has_holes[slot]:
            continue
        best = best_all[slot]
        for i in range(n_listed):  # every listed component is a hole: the others joined the outside
            a = listed[i]
            if dirty[a]:
                # The hole contour's pixels span the hole's box grown by one; boundingRect then
                # adds one more on the right and bottom (clipped), as for outer contours.
                iou[a] = _max_iou(box[a, 0] - 1, box[a, 1] - 1, min(box[a, 2] + 2, width - 1),
                                  min(box[a, 3] + 2, height - 1), gt)
                dirty[a] = 0
            if iou[a] > best:
                best = iou[a]
        best_all[slot] = best
    for i in range(0, start[last_hole_level + 1]):
        p = order[i]
        parent[p] = -1
        listed_at[p] = -1
    _set_frame(parent, -1, wp, region_x0, region_y0, region_x1, region_y1)
    parent[outside] = -1
