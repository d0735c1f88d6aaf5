"""The demo ``up`` seeds and the pictures it sends: the demo login, organization and API key,
a gradient for the ``resize`` job, and a garment photo drawn here (with the studio's second,
interior frame) for the ``ghost_mannequin`` job, so nothing is shipped."""

from __future__ import annotations

import contextlib
import datetime
import io
import math
from collections.abc import Sequence
from typing import Any

from hiddenmodel.up.supervisor import UpError

DEMO_EMAIL = "demo@hiddenmodel.dev"
DEMO_PASSWORD = "Invisible-model-2026"  # noqa: S105 - a documented demo account on a dev machine
DEMO_ORG_SLUG = "demo"
DEMO_ORG_NAME = "Demo Studio"
DEMO_KEY_SCOPES = ["jobs:write", "jobs:read", "usage:read", "admin"]
# Each run revokes the keys an earlier run made (named so) and makes one that expires.
DEMO_KEY_NAME = "demo key"
DEMO_KEY_TTL = datetime.timedelta(days=7)
DEMO_IMAGE_SIZE = (256, 256)
GHOST_PHOTO_SIZE = (360, 480)
# Under HM_DATA_DIR: the garment photo of the demo job, kept for trying the API by hand.
GHOST_PHOTO_FILE = "demo-garment.png"
# The studio's second frame of the same garment (the neck joint), beside the photo.
GHOST_INTERIOR_FILE = "demo-garment-inside.png"
# The picture the printed resize example sends.
DEMO_IMAGE_FILE = "demo.png"
# The demo organization is a development machine's tenant: no monthly quota (each run of up
# sends demo jobs, and trying the API by hand or benchmarking it would use a free plan's 200
# images a month up), and request rates no client on one machine reaches. The in-flight and
# queue caps stay the plan's. Set once; an operator's later plan assignment is kept.
DEMO_LIMITS: dict[str, int | None] = {
    "monthly_images": None,
    "monthly_gpu_seconds": None,
    "storage_bytes": None,
    "requests_per_minute": 600_000,
    "org_requests_per_minute": 600_000,
}


async def seed_demo() -> str:
    """The demo user, org and a fresh API key (keys are shown only once, so each run makes
    one, revoking the earlier runs' and expiring after :data:`DEMO_KEY_TTL`); the user and org
    from an earlier run are reused."""
    from fastapi_users.exceptions import UserAlreadyExists

    from hiddenmodel import provisioning
    from hiddenmodel.db import dispose_engines
    from hiddenmodel.errors import Conflict, Problem

    try:
        with contextlib.suppress(UserAlreadyExists, Conflict):
            await provisioning.create_user(DEMO_EMAIL, DEMO_PASSWORD)
        with contextlib.suppress(Conflict):
            await provisioning.create_org(DEMO_ORG_SLUG, DEMO_ORG_NAME, DEMO_EMAIL)
        await provisioning.set_limits_if_unassigned(DEMO_ORG_SLUG, DEMO_LIMITS)
        now = datetime.datetime.now(datetime.UTC)
        return await provisioning.replace_api_keys(
            DEMO_ORG_SLUG,
            DEMO_KEY_NAME,
            f"{DEMO_KEY_NAME} {now:%Y-%m-%d %H:%M:%S}",
            DEMO_KEY_SCOPES,
            expires_at=now + DEMO_KEY_TTL,
        )
    except Problem as exc:
        raise UpError(f"creating the demo data: {exc.detail or exc.title}") from exc
    finally:
        await dispose_engines()


def demo_image() -> bytes:
    """A small colour gradient: a real PNG for a real job, made here so nothing is shipped."""
    from PIL import Image

    ramp = Image.linear_gradient("L").resize(DEMO_IMAGE_SIZE)
    image = Image.merge("RGB", (ramp, ramp.rotate(90), Image.new("L", DEMO_IMAGE_SIZE, 160)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def demo_garment_photo(interior: bool = False) -> bytes:
    """A studio shot drawn here, so nothing is shipped: a navy T-shirt on a beige mannequin on
    a stand, in front of a light gradient backdrop, softened and with sensor noise like a real
    photo. It is what the classical segmenter expects of a ghost-mannequin studio: a plain
    backdrop and a mannequin of one colour.

    With ``interior``, the studio's second frame of the same garment from the same camera:
    the mannequin's head and neck piece taken off, so the inside back of the shirt shows
    through the neck opening (the ``interior`` input of ``ghost_mannequin``)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    width, height = GHOST_PHOTO_SIZE
    cx = width / 2
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # The backdrop: lighter at the top, slightly darker towards the sides.
    t = (ys / (height - 1))[..., None]
    img = np.asarray([240, 239, 236], np.float64) * (1 - t) + np.asarray([214, 213, 210]) * t
    img -= 7.0 * (((xs - cx) / cx) ** 2)[..., None]
    Points = Sequence[tuple[float, float]]

    def shape(
        *polygons: Points, ellipses: Sequence[tuple[tuple[float, float], tuple[float, float]]] = ()
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        canvas = Image.new("L", GHOST_PHOTO_SIZE, 0)
        draw = ImageDraw.Draw(canvas)
        for points in polygons:
            draw.polygon(points, fill=255)
        for (ex, ey), (ax, ay) in ellipses:
            draw.ellipse((ex - ax, ey - ay, ex + ax, ey + ay), fill=255)
        return np.asarray(canvas) > 127

    def mirrored(*left: tuple[float, float]) -> Points:
        """A symmetric outline from its left half, top to bottom."""
        return [*left, *((2 * cx - x, y) for x, y in reversed(left))]

    def paint(
        region: np.ndarray[Any, np.dtype[np.bool_]],
        rgb: tuple[int, int, int],
        amp: float,
        folds: float = 0.0,
    ) -> None:
        # Lit from the front: brightest down the middle of the part, with a few soft folds.
        cols = xs[region]
        centre, half = cols.mean(), max(float(np.ptp(cols)) / 2, 1.0)
        light = 1 + amp * (0.5 - ((xs - centre) / half) ** 2) + folds * np.sin(xs / 9 + ys / 23)
        img[region] = (np.asarray(rgb, np.float64) * light[..., None])[region]

    limbs: list[Points] = []
    joints: list[tuple[tuple[float, float], tuple[float, float]]] = []
    sleeves: list[Points] = []
    for side in (-1, 1):
        shoulder, wrist = (cx + side * 63, 128.0), (cx + side * 118, 292.0)
        length = math.dist(shoulder, wrist)
        ux, uy = (wrist[0] - shoulder[0]) / length, (wrist[1] - shoulder[1]) / length
        nx, ny = -uy, ux
        limbs.append(
            [
                (shoulder[0] + 14 * nx, shoulder[1] + 14 * ny),
                (wrist[0] + 10 * nx, wrist[1] + 10 * ny),
                (wrist[0] - 10 * nx, wrist[1] - 10 * ny),
                (shoulder[0] - 14 * nx, shoulder[1] - 14 * ny),
            ]
        )
        hand = (wrist[0] + 12 * ux, wrist[1] + 12 * uy)
        joints += [(shoulder, (14, 14)), (wrist, (10, 10)), (hand, (9, 15))]
        # A short sleeve down the arm, 40 px wide at its opening.
        cuff = (shoulder[0] + 78 * ux, shoulder[1] + 78 * uy)
        ox, oy = uy * side, -ux * side
        sleeves.append(
            [
                (cx + side * 40, 104),
                (cx + side * 82, 112),
                (cuff[0] + 20 * ox, cuff[1] + 20 * oy),
                (cuff[0] - 20 * ox, cuff[1] - 20 * oy),
                (cx + side * 56, 170),
            ]
        )
    torso = mirrored(
        (cx - 18, 104),
        (cx - 54, 112),
        (cx - 68, 122),
        (cx - 70, 140),
        (cx - 58, 200),
        (cx - 52, 250),
        (cx - 58, 290),
        (cx - 62, 332),
    )
    neck = mirrored((cx - 15, 58), (cx - 17, 112))
    if interior:
        mannequin = shape(torso, *limbs, ellipses=joints)
    else:
        mannequin = shape(torso, neck, *limbs, ellipses=[((cx, 42), (24, 31)), *joints])
    stand = shape(
        [(cx - 5, 320), (cx + 5, 320), (cx + 5, 462), (cx - 5, 462)],
        ellipses=[((cx, 464), (56, 8))],
    )
    body = mirrored((cx - 23, 100), (cx - 74, 112), (cx - 74, 124), (cx - 62, 165), (cx - 66, 300))
    neckline = Image.new("L", GHOST_PHOTO_SIZE, 0)
    # The lower half of an ellipse: the front of a round neck, where the mannequin shows.
    ImageDraw.Draw(neckline).pieslice((cx - 23, 70, cx + 23, 130), 0, 180, fill=255)
    shirt = shape(body, *sleeves) & ~(np.asarray(neckline) > 127)

    paint(stand, (120, 122, 128), 0.1)
    paint(mannequin, (224, 196, 168), 0.18)
    paint(shirt, (32, 48, 96), 0.22, 0.05)
    if interior:
        # The inner back of the shirt, in the shadow of the front, fills the neck opening.
        paint(np.asarray(neckline) > 127, (22, 33, 68), 0.12, 0.05)
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    soft = np.asarray(photo.filter(ImageFilter.GaussianBlur(0.6)), np.float64)
    noisy = soft + np.random.default_rng(7).normal(0.0, 2.5, soft.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()
