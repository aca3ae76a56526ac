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

Box convention (spec §2.2 step 7, kept as the reference does): boundingRect's x+w is one past the
last pixel, clipped to width-1, and the box is then used as inclusive.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# Per 2x2 block, its four corners as bits: top-left 1, top-right 2, bottom-left 4, bottom-right 8.
# Doubled polygon area of a hole-free component: 2 per full block, 1 per three-corner block.
_AREA2 = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1, 2], dtype=np.int64)
# Euler number times 4 for 8-connectivity (Gray's bit-quads): +1 per one-corner block, -1 per
# three-corner block, -2 per diagonal pair. A component's hole count is 1 - EULER4 / 4.
_EULER4 = np.array([0, 1, 1, 0, 1, 0, -2, -1, 1, -2, 0, -1, 0, -1, -1, 0], dtype=np.int64)

# The kernels index a copy of the map padded by one absent pixel on each side, so neighbours need
# no bounds checks, and the padding ring doubles as "outside" for the hole search.


@njit(cache=True, nogil=True)
def _find(parent, p):
    while parent[p] != p:  # path halving
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


@njit(cache=True, nogil=True)
def _max_iou(x0, y0, x1, y1, gt):
    """Max over ground-truth boxes of the protocol's IoU (spec §2.3: inclusive, +1 areas)."""
    best = 0.0
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for g in range(gt.shape[0]):
        ix = min(x1, gt[g, 2]) - max(x0, gt[g, 0]) + 1
        iy = min(y1, gt[g, 3]) - max(y0, gt[g, 1]) + 1
        inter = max(0, ix) * max(0, iy)
        denominator = area + (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1) - inter
        iou = inter / denominator if denominator > 0 else 0.0
        if iou > best:
            best = iou
    return best


@njit(cache=True, nogil=True)
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
        self.block = np.zeros(n, dtype=np.uint8)  # 2x2 blocks, by the padded index of their bottom-right pixel
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
           best_all, best_largest, w.parent, w.size, w.box, w.area2, w.euler4, w.dirty, w.iou, w.listed,
           w.listed_at, w.order, w.block)
    return best_all, best_largest


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _list_if_large(a, area, min_area, listed, listed_at, n_listed):
    """Add root a (not listed yet) once its evaluated box can reach the IoU floor (boxes only grow)."""
    if area >= min_area:
        listed[n_listed] = a
        listed_at[a] = n_listed
        n_listed += 1
    return n_listed


@njit(cache=True, nogil=True)
def _sweep(quantized, level_slot, gt, largest, min_area, best_all, best_largest,
           parent, size, box, area2, euler4, dirty, iou, listed, listed_at, order, block):
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
    # The region the hole search needs: the union of the boxes of listed components with holes.
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

    neighbours8 = np.array([-wp - 1, -wp, -wp + 1, -1, 1, wp - 1, wp, wp + 1])
    neighbours4 = np.array([-wp, -1, 1, wp])
    corner_block = np.array([0, 1, wp, wp + 1])  # the blocks this pixel is the BR, BL, TR, TL corner of
    corner_bit = np.array([8, 4, 2, 1])

    # ---- Foreground: 8-connected components of U > t, t falling. -------------------------------
    n_listed = 0
    n_components = 0
    euler4_total = 0
    for t in range(maximum - 1, lowest - 1, -1):
        for i in range(start[t + 1], start[t + 2]):
            p = order[i]
            r = p // wp - 1
            c = p - (r + 1) * wp - 1
            parent[p] = p
            size[p] = 1
            box[p, 0] = c
            box[p, 1] = r
            box[p, 2] = c
            box[p, 3] = r
            area2[p] = 0
            euler4[p] = 0
            n_components += 1
            root = p
            for k in range(8):
                q = p + neighbours8[k]
                if parent[q] < 0:
                    continue
                other = _find(parent, q)
                if other == root:
                    continue
                if size[root] < size[other]:
                    root, other = other, root
                n_listed = _merge(root, other, parent, size, box, area2, euler4, dirty, listed, listed_at, n_listed)
                n_components -= 1
            # The 2x2 blocks with this pixel as a corner: their present pixels are all 8-adjacent
            # to it, so they belong to `root` now.
            for k in range(4):
                b = p + corner_block[k]
                old = block[b]
                new = old | corner_bit[k]
                block[b] = new
                change = _EULER4[new] - _EULER4[old]
                euler4[root] += change
                euler4_total += change
                area2[root] += _AREA2[new] - _AREA2[old]
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
            if any_holes and euler4[a] != 4:
                # A hole's box lies inside its component's box, so only the holes of listed
                # components can reach the floor; the hole search covers their boxes only.
                has_holes[slot] = True
                region_x0 = min(region_x0, box[a, 0])
                region_y0 = min(region_y0, box[a, 1])
                region_x1 = max(region_x1, box[a, 2])
                region_y1 = max(region_y1, box[a, 3])
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
        for k in range(4):
            block[p + corner_block[k]] = 0

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
    # is no hole of any listed component. One root stands for all of them.
    outside = 0  # a padding pixel: never one of the region's own pixels
    parent[outside] = outside
    size[outside] = (height + 2) * wp
    listed_at[outside] = -1
    n_listed = 0
    for t in range(0, last_hole_level + 1):
        for i in range(start[t], start[t + 1]):
            p = order[i]
            r = p // wp - 1
            c = p - (r + 1) * wp - 1
            if r < region_y0 or r > region_y1 or c < region_x0 or c > region_x1:
                continue
            parent[p] = p
            size[p] = 1
            box[p, 0] = c
            box[p, 1] = r
            box[p, 2] = c
            box[p, 3] = r
            root = p
            for k in range(4):
                q = p + neighbours4[k]
                rq = r + (-1 if k == 0 else (1 if k == 3 else 0))
                cq = c + (-1 if k == 1 else (1 if k == 2 else 0))
                if rq < region_y0 or rq > region_y1 or cq < region_x0 or cq > region_x1:
                    other = _find(parent, outside)
                elif parent[q] < 0:
                    continue
                else:
                    other = _find(parent, q)
                if other == root:
                    continue
                if size[root] < size[other]:
                    root, other = other, root
                n_listed = _merge(root, other, parent, size, box, area2, euler4, dirty, listed, listed_at, n_listed)
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
    parent[outside] = -1
