"""freshnet Space: a Gradio 6 image classifier serving the fastai model.pkl next to this file.

This file is pushed to the Space as-is: it imports nothing from freshnet. Environment:
  GRADIO_SERVER_PORT / GRADIO_SERVER_NAME   where to listen (Gradio's own variables)
  FRESHNET_MAX_UPLOAD_MB                    upload size cap (default 10)
  FRESHNET_CONCURRENCY                      predictions run at once (default 4)
  FRESHNET_TORCH_THREADS                    torch threads (default: cores / concurrency, at least 1)
  FRESHNET_COMPILE                          1 (default): compile the model with torch.compile in the
                                            background; 0: always run the eager model
  FRESHNET_FEEDBACK                         feedback sink: a folder (default ./feedback) or s3://bucket/prefix
  FRESHNET_FEEDBACK_REPO                    send feedback to this Hub dataset ("owner/name") instead;
                                            default: metadata.json's feedback_repo (space.feedback_repo)
  FRESHNET_FEEDBACK_TOKEN                   its token (a Space secret): write access to that dataset only
  FRESHNET_FEEDBACK_EVERY_MIN               commit corrections this often (default: metadata.json's
                                            feedback_every_min, else 5)
  FRESHNET_MAX_PIXELS                       largest photo accepted, in pixels (default 50 million)
  FRESHNET_MAX_DECODE_MB                    memory one photo may need decoded (default 256): counted
                                            in bytes per pixel, so 16-bit and transparent images
                                            count fully; with FRESHNET_CONCURRENCY=4 at most ~1 GB
  FRESHNET_UPLOAD_TTL_S                     uploads are deleted from Gradio's cache after this
                                            many seconds (default 900)

Feedback format (read by freshnet's `feedback` source), one pair per correction (in a Hub dataset
repo, <sink> is feedback/<replica uuid>, one per app process):
  <sink>/<label>/<id>.jpg    the upload normalised like ingest: RGB JPEG, max side 400
  <sink>/<label>/<id>.json   {"id", "label", "predicted", "probabilities", "model_version", "time"}:
                             label a class of the model, probabilities only for its classes (at
                             most one per class), every text field at most 200 characters

Errors shown to users never carry server details (paths, exception text): those go to the log.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
NOT_AN_IMAGE = "That file is not an image we can read. Please upload a JPEG, PNG or WebP photo."
SERVER_ERROR = "Something went wrong on our side. Please try again in a moment."
MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo fits
MAX_DECODE_MB = 256
UPLOAD_TTL_S = 900
FEEDBACK_MAX_SIDE = 400  # like freshnet's images.max_side default: feedback is stored small
MAX_TEXT = 200  # characters in any text field of a feedback record (freshnet's reader's limit)
MAX_PROBABILITIES = 100  # entries in a record's probabilities, whatever the model
# Bytes per pixel Pillow stores (3-channel modes take 4); anything but RGB is then converted to
# RGB at full size by the model's loader, another 4.
_STORAGE_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Anything that looks like a filesystem path, in a message a user is about to see.
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"<>]+[/\\])+[^\s/\\'\"<>,;:)]*")

log = logging.getLogger("freshnet.space")


class Classifier:
    """The exported fastai learner, loaded once; predicts with exactly its validation transforms."""

    def __init__(self, model_path: str | Path, compile: bool | None = None):
        import torch
        from fastai.learner import load_learner
        from fasttransform import Pipeline

        try:
            self.learn = load_learner(model_path, cpu=True)
        except UnboundLocalError:
            # fastai swallows the ImportError of a module the pickle needs; load again to raise it
            torch.load(model_path, map_location="cpu", weights_only=False)
            raise
        # Our own channels-last copy: oneDNN's NHWC kernels (depthwise convolutions above all)
        # run this model ~30% faster on CPU with the same numbers (differences ~1e-12); a copy
        # so that self.learn stays exactly as exported.
        self.model = copy.deepcopy(self.learn.model).eval().to(memory_format=torch.channels_last)
        dl = self.learn.dls.valid
        # split_idx=1 selects validation behaviour (center crop, no augmentation); the loaded
        # pipelines carry no split until a DataLoader iterates, so set it explicitly.
        self.item_tfms = Pipeline(dl.after_item.fs, split_idx=1)
        self.batch_tfms = Pipeline(dl.after_batch.fs, split_idx=1)
        self.vocab = [str(v) for v in self.learn.dls.vocab]
        self.activation = getattr(self.learn.loss_func, "activation", None) or (
            lambda x: torch.softmax(x, dim=-1)
        )
        self._torch = torch
        # The compiled model (torch.compile, built in the background) once it has proven to give
        # the eager model's probabilities. torch.compile'd code is not thread-safe, so one request
        # at a time runs it and any other runs the eager model meanwhile.
        self.fast: Any = None
        self.fast_calls = 0  # requests the compiled model answered
        self.fast_ready = threading.Event()  # set when compiling has finished, well or not
        self._fast_lock = threading.Lock()
        self._fast_shape: tuple[int, ...] | None = None
        if compile is None:
            compile = os.environ.get("FRESHNET_COMPILE", "1") != "0"
        if compile:
            threading.Thread(target=self._compile, name="freshnet-compile", daemon=True).start()
        else:
            self.fast_ready.set()

    def _compile(self) -> None:
        """Compile the model for the one input shape the transforms produce; keep it only if its
        probabilities equal the eager model's (within 5e-5) on probe images. Any failure (no C
        compiler on the host, an untraceable model) leaves the app on the eager model."""
        torch = self._torch
        started = time.monotonic()
        try:
            from PIL import Image

            gen = torch.Generator().manual_seed(0)
            compiled = torch.compile(self.model, dynamic=False)
            # Exactly as in probabilities(): the guards check inference mode and the input's layout.
            with torch.inference_mode():
                for _ in range(2):
                    noise = torch.randint(0, 256, (240, 320, 3), generator=gen, dtype=torch.uint8)
                    xb = self._tensor(Image.fromarray(noise.numpy()))
                    fast = self.activation(compiled(xb))
                    slow = self.activation(self.model(xb))
                    diff = float((fast - slow).abs().max())
                    # Float rounding is ~1e-6; fastai's own predict is the reference (1e-4).
                    if diff > 5e-5:
                        log.warning("compiled model differs from eager by %.1e; using eager", diff)
                        return
            # A later input that fails the compiled guards must raise (and fall back to eager),
            # not recompile inside a request. The stance is process-wide: the app compiles one
            # model per process.
            torch.compiler.set_stance("fail_on_recompile")
            self._fast_shape = tuple(xb.shape)
            self.fast = compiled
            log.info("compiled model ready in %.1f s", time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - compiling is an optimisation, never a failure
            log.warning("cannot compile the model (%s: %s); using eager", type(exc).__name__, exc)
        finally:
            self.fast_ready.set()

    def _forward(self, xb: Any) -> Any:
        fast = self.fast
        if fast is not None and tuple(xb.shape) == self._fast_shape:
            if self._fast_lock.acquire(blocking=False):
                try:
                    out = fast(xb)
                    self.fast_calls += 1
                    return out
                except Exception as exc:  # noqa: BLE001
                    log.warning("compiled model failed (%s); using eager from now on", exc)
                    self.fast = None
                finally:
                    self._fast_lock.release()
        return self.model(xb)

    def _tensor(self, image: Any):
        from fastai.vision.core import PILImage

        img = PILImage.create(image)  # same loader learn.predict uses (RGB, no EXIF transpose)
        x = self.item_tfms(img)
        # A plain tensor skips fastai's per-op __torch_function__ dispatch on TensorImage
        # (same numbers, a large share of learn.predict's CPU time).
        xb = self.batch_tfms(x[None]).as_subclass(self._torch.Tensor)
        return xb.contiguous(memory_format=self._torch.channels_last)

    def probabilities(self, image: Any) -> list[float]:
        """Class probabilities for a path, bytes or PIL image, in vocab order."""
        with self._torch.inference_mode():
            xb = self._tensor(image)
            out = self.activation(self._forward(xb))
        return [float(p) for p in out[0]]

    def predict(self, image: Any, top: int | None = None) -> dict[str, float]:
        """Label -> probability, best first (all classes, or the ``top`` best)."""
        probs = self.probabilities(image)
        ranked = sorted(zip(self.vocab, probs, strict=True), key=lambda kv: -kv[1])
        return dict(ranked[:top] if top else ranked)


def load_metadata(bundle: Path = HERE) -> dict[str, Any]:
    path = bundle / "metadata.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def example_paths(bundle: Path = HERE) -> list[str]:
    folder = bundle / "examples"
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


class ImageRefused(Exception):
    """An upload the app will not decode; the message is meant for the user."""


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def scrub(text: str) -> str:
    """``text`` without anything that looks like a filesystem path."""
    return _PATH_RE.sub("<file>", text)


def check_image(path: str | Path, max_pixels: int | None = None, max_mb: int | None = None):
    """Refuse, from the header alone, an image too large to decode (pixels, or bytes per pixel)."""
    from PIL import Image

    max_pixels = max_pixels or _env_int("FRESHNET_MAX_PIXELS", MAX_PIXELS)
    max_bytes = (max_mb or _env_int("FRESHNET_MAX_DECODE_MB", MAX_DECODE_MB)) * 2**20
    try:
        with warnings.catch_warnings():
            # Our caps decide, below; Pillow's own bomb limit only as a last resort.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                (w, h), mode = im.size, im.mode
    except Image.DecompressionBombError:
        raise ImageRefused(_too_big(None, None, max_pixels)) from None
    except Exception:  # noqa: BLE001 - whatever Pillow cannot open is not an image for us
        raise ImageRefused(NOT_AN_IMAGE) from None
    if w * h > max_pixels:
        raise ImageRefused(_too_big(w, h, max_pixels))
    cost = w * h * (_STORAGE_BPP.get(mode, 4) + (0 if mode == "RGB" else 4))
    if cost > max_bytes:
        raise ImageRefused(
            f"This photo ({w} × {h} pixels, {_mode_words(mode)}) needs too much memory for us "
            "to process. Please upload a smaller photo, or save it as an ordinary JPEG first."
        )


def _too_big(w: int | None, h: int | None, max_pixels: int) -> str:
    size = f" ({w} × {h} pixels)" if w else ""
    return (
        f"This photo is too large{size}. Please upload one of at most "
        f"{max_pixels / 1e6:g} megapixels."
    )


def _mode_words(mode: str) -> str:
    if mode.startswith("I;16") or mode in ("I", "F"):
        return "16-bit or more per channel"
    if "A" in mode or mode == "P":
        return "with transparency" if "A" in mode else "palette colours"
    return f"colour mode {mode}"


_ORIENTATION = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def normalise_image(path: str | Path, max_side: int = FEEDBACK_MAX_SIDE) -> bytes:
    """The image as freshnet's ingest stores it: RGB JPEG (quality 90), EXIF orientation
    applied, transparency on white, at most ``max_side`` pixels on its longer side. Shrinks
    first, in the decoded mode, so no full-size copy is made (check_image bounds the decode)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(im.mode, (max_side, max_side))  # decode at a reduced DCT scale
        im.seek(0)
        im.load()
        try:
            orientation = _ORIENTATION.get(im.getexif().get(0x0112))
        except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
            orientation = None
        if im.mode == "1":
            im = im.convert("L")
        elif im.mode in ("P", "PA"):
            alpha = im.mode == "PA" or "transparency" in im.info
            im = im.convert("RGBA" if alpha else "RGB")
        if max(im.size) > max_side:
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.BOX)  # premultiplies alpha itself
        if im.mode.startswith("I;16"):
            im = im.point(lambda v: v / 256).convert("L")  # the high byte, not clipped at 255
        if im.mode in ("LA", "PA", "La", "RGBa", "RGBA"):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = im.convert("RGB")
        if orientation:
            im = im.transpose(getattr(Image.Transpose, orientation))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _probability(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def clean_probabilities(
    predicted: Any, classes: list[str] | None = None, limit: int = MAX_PROBABILITIES
) -> dict[str, float]:
    """{label: probability} kept only for known classes (or short labels when none are known),
    with values in [0, 1], best first, at most one per class and ``limit`` in all."""
    if not isinstance(predicted, dict):
        return {}
    known = set(classes) if classes is not None else None
    out: dict[str, float] = {}
    for key, value in predicted.items():
        p = _probability(value)
        if p is None or not isinstance(key, str) or len(key) > MAX_TEXT:
            continue
        if known is not None and key not in known:
            continue
        out[key] = p
        if len(out) >= 4 * limit:  # enough to pick the best from; the rest is not read
            break
    cap = min(limit, len(known)) if known is not None else limit
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:cap])


class FeedbackSink:
    """Writes corrections as <label>/<id>.jpg + <label>/<id>.json to a folder or s3://bucket/prefix.

    Every field is bounded: the label must be one of ``classes`` (when given), probabilities are
    kept for known classes only, text is cut to MAX_TEXT; the image is normalised and capped
    like ingest's, so a record is a few hundred bytes and its image a few tens of KB.
    """

    def __init__(
        self, where: str, classes: list[str] | None = None, max_side: int = FEEDBACK_MAX_SIDE
    ):
        self.where = where
        self.classes = list(classes) if classes is not None else None
        self.max_side = max_side

    def write(self, image_path: str, label: str, predicted: dict[str, float], version: str) -> str:
        if not isinstance(label, str) or not label or len(label) > MAX_TEXT:
            raise ValueError("the label must be a short non-empty string")
        if self.classes is not None and label not in self.classes:
            raise ValueError(f"{label[:40]!r} is not one of the model's classes")
        check_image(image_path)
        data = normalise_image(image_path, self.max_side)
        fid = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        probs = clean_probabilities(predicted, self.classes)
        record = {
            "id": fid,
            "label": label,
            "predicted": next(iter(probs), None),
            "probabilities": probs,
            "model_version": str(version)[:MAX_TEXT],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        meta = json.dumps(record, indent=1).encode()
        safe_label = label.replace("/", "_")
        if self.where.startswith("s3://"):
            import boto3  # only needed when the sink is S3

            bucket, _, prefix = self.where[len("s3://") :].partition("/")
            base = f"{prefix.strip('/')}/{safe_label}/{fid}".lstrip("/")
            s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
            s3.put_object(Bucket=bucket, Key=f"{base}.jpg", Body=data)
            s3.put_object(Bucket=bucket, Key=f"{base}.json", Body=meta)
        else:
            folder = Path(self.where) / safe_label
            folder.mkdir(parents=True, exist_ok=True)
            # Image first, record last: a reader that sees the .json finds a complete pair.
            (folder / f"{fid}.jpg").write_bytes(data)
            tmp = folder / f".{fid}.json.tmp"
            tmp.write_bytes(meta)
            tmp.replace(folder / f"{fid}.json")
        return fid


FEEDBACK_TOKEN_ENV = "FRESHNET_FEEDBACK_TOKEN"


class FeedbackRepoError(RuntimeError):
    """The feedback dataset repo cannot be used (missing or wrong token, no such repo)."""


def _repo_problem(exc: Exception, repo_id: str, write: bool) -> str:
    """A message naming the repo and the Space secret, for the log (never shown to users)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    where = f"feedback repo datasets/{repo_id}"
    if status == 403 and write:
        return (
            f"{where}: the token in {FEEDBACK_TOKEN_ENV} cannot write to it (HTTP 403); give the "
            "Space secret a token with write access to this dataset"
        )
    if status in (401, 403, 404):
        return (
            f"{where}: HTTP {status}, the token in {FEEDBACK_TOKEN_ENV} is wrong or has no access "
            "to this dataset, or the dataset does not exist; create the dataset and set the Space "
            f"secret {FEEDBACK_TOKEN_ENV} to a token with write access to it"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where}: {type(exc).__name__}: {first}"


def _make_scheduler(repo_id: str, token: str, folder: Path, replica: str, every_min: float):
    """huggingface_hub's CommitScheduler for one replica's folder, with errors that name the repo
    and the secret; built here so that importing app.py does not import huggingface_hub."""
    from huggingface_hub import CommitScheduler, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoUrl

    class _Api(HfApi):
        def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
            # The dataset is made by its owner; the app's token may write to it only (a
            # fine-grained token cannot create repos). Check it is there and readable instead.
            try:
                self.dataset_info(repo_id)
            except HfHubHTTPError as exc:
                raise FeedbackRepoError(_repo_problem(exc, repo_id, write=False)) from None
            return RepoUrl(f"{self.endpoint}/datasets/{repo_id}", endpoint=self.endpoint)

    class _Scheduler(CommitScheduler):
        last_error: str | None = None

        def push_to_hub(self) -> Any:
            try:
                info = super().push_to_hub()
            except HfHubHTTPError as exc:
                # The files stay in the folder, unmarked: the next run sends them again.
                self.last_error = _repo_problem(exc, repo_id, write=True)
                log.error("feedback not sent: %s", self.last_error)
                raise FeedbackRepoError(self.last_error) from None
            self.last_error = None
            if info is not None:
                log.info("feedback committed to datasets/%s (%s)", repo_id, info.oid)
            return info

    return _Scheduler(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=folder,
        path_in_repo=f"feedback/{replica}",
        every=every_min,
        # HF_ENDPOINT read now, not at huggingface_hub's import (a mirror, or a test's stand-in).
        hf_api=_Api(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token),
    )


class HubFeedbackSink:
    """Corrections committed to a Hub dataset repo by huggingface_hub's CommitScheduler.

    Append-only, one pair per correction as FeedbackSink writes them (normalised, bounded), under
    ``feedback/<replica>/<label>/<id>.{jpg,json}``: each app process (replica) has its own uuid
    folder, so replicas never write the same path. A correction is kept in a local folder until
    the scheduler's next commit (every ``every_min`` minutes; the Space disk is ephemeral, so at
    most that long of corrections is lost if the Space is killed without a clean stop). The
    token: the Space secret FRESHNET_FEEDBACK_TOKEN, write access to this one dataset.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None,
        classes: list[str] | None = None,
        every_min: float = 5.0,
        folder: str | Path | None = None,
        max_side: int = FEEDBACK_MAX_SIDE,
    ):
        if not token:
            raise FeedbackRepoError(
                f"feedback repo datasets/{repo_id} is set but {FEEDBACK_TOKEN_ENV} is not: add "
                "a token with write access to this dataset as that Space secret"
            )
        import tempfile

        self.repo_id = repo_id
        self.replica = uuid.uuid4().hex
        self.folder = Path(folder or tempfile.mkdtemp(prefix="freshnet-feedback-"))
        self.local = FeedbackSink(str(self.folder), classes, max_side)
        self.scheduler = _make_scheduler(repo_id, token, self.folder, self.replica, every_min)
        self.where = f"datasets/{repo_id}/feedback/{self.replica}"

    def write(self, image_path: str, label: str, predicted: dict[str, float], version: str) -> str:
        # Under the scheduler's lock: a commit lists the folder either before this pair or
        # after both files are complete.
        with self.scheduler.lock:
            return self.local.write(image_path, label, predicted, version)

    def flush(self, timeout_s: float | None = 60.0) -> Any:
        """Commit what is waiting now (a stop, a test); raises FeedbackRepoError on failure."""
        return self.scheduler.trigger().result(timeout_s)

    def stop(self) -> None:
        self.scheduler.stop()


def make_sink(bundle: Path, meta: dict[str, Any], classes: list[str]) -> Any:
    """The feedback sink the settings ask for: the Hub dataset repo (FRESHNET_FEEDBACK_REPO or
    metadata.json's feedback_repo) or else FRESHNET_FEEDBACK (a folder or s3://)."""
    repo = os.environ.get("FRESHNET_FEEDBACK_REPO") or meta.get("feedback_repo")
    if repo:
        repo = str(repo).removeprefix("hf://datasets/").strip("/")
        every = float(
            os.environ.get("FRESHNET_FEEDBACK_EVERY_MIN") or meta.get("feedback_every_min") or 5
        )
        return HubFeedbackSink(
            repo, os.environ.get(FEEDBACK_TOKEN_ENV), classes=classes, every_min=every
        )
    return FeedbackSink(os.environ.get("FRESHNET_FEEDBACK") or str(bundle / "feedback"), classes)


def _describe(meta: dict[str, Any]) -> str:
    acc = meta.get("holdout_accuracy")
    parts = [f"**Model** `{meta.get('version', 'unknown')}`"]
    if meta.get("date"):
        parts.append(f"trained {meta['date']}")
    if isinstance(acc, int | float):
        parts.append(f"holdout accuracy **{acc:.1%}**")
    if meta.get("dataset"):
        parts.append(f"dataset `{meta['dataset']}`")
    return " · ".join(parts)


def build_demo(bundle: Path = HERE, classifier: Classifier | None = None):
    """The Gradio Blocks app for the bundle at ``bundle``."""
    import gradio as gr

    meta = load_metadata(bundle)
    clf = classifier or Classifier(bundle / "model.pkl")
    sink = make_sink(bundle, meta, clf.vocab)
    title = meta.get("title") or "freshnet classifier"
    version = str(meta.get("version", "unknown"))
    lock = threading.Lock()
    ttl = _env_int("FRESHNET_UPLOAD_TTL_S", UPLOAD_TTL_S)

    @_user_errors(gr)
    def classify(path: str | None) -> dict[str, float]:
        if not path:
            raise gr.Error("Please upload a photo first.")
        check_image(path)  # before any decoding: a small file can hold a huge image
        try:
            return clf.predict(path, top=5)
        except Exception as exc:  # noqa: BLE001 - PIL refuses anything that is not a readable image
            log.info("predict refused %s: %s", path, exc)
            raise gr.Error(NOT_AN_IMAGE) from None

    @_user_errors(gr)
    def send_feedback(path: str | None, predicted: dict | None, label: str | None) -> str:
        if not path:
            return "Upload a photo first."
        if not label:
            return "Pick the correct label first."
        if label not in clf.vocab:
            return "Pick one of the labels in the list."
        # gr.Label hands its value back as {label: confidence}; the sink keeps known classes only.
        with lock:
            sink.write(path, label, predicted if isinstance(predicted, dict) else {}, version)
        return f"Thanks! Recorded **{label}** for the next training run."

    def metadata() -> dict[str, Any]:
        return meta

    # Uploads (and Gradio's other temporary files) are deleted once older than the TTL.
    with gr.Blocks(title=title, delete_cache=(max(1, min(60, ttl // 2)), ttl)) as demo:
        gr.Markdown(f"# {title}\n{meta.get('description', '')}")
        gr.Markdown(_describe(meta), elem_id="model-info")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    image_mode=None,  # keep the uploaded file as-is: the model converts to RGB
                    sources=["upload", "clipboard", "webcam"],
                    label="Photo",
                    elem_id="photo",
                )
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                label = gr.Label(num_top_classes=5, label="Top 5", elem_id="top5")
        examples = example_paths(bundle)
        if examples:
            gr.Examples(
                examples=examples,
                inputs=image,
                outputs=label,
                fn=classify,
                cache_examples=False,
                run_on_click=True,
                api_name=False,
            )
        with gr.Accordion("Wrong label?", open=False):
            correct = gr.Dropdown(choices=clf.vocab, label="Correct label", elem_id="correct")
            send = gr.Button("Send correction", elem_id="send-feedback")
            thanks = gr.Markdown(elem_id="feedback-status")

        _guard_image_preprocess(image, gr)
        button.click(classify, inputs=image, outputs=label, api_name="predict")
        image.upload(classify, inputs=image, outputs=label, api_name=False)
        send.click(
            send_feedback, inputs=[image, label, correct], outputs=thanks, api_name="feedback"
        )
        gr.api(metadata, api_name="metadata")
    demo.freshnet_sink = sink  # main() flushes a Hub sink on SIGTERM
    return demo


def _user_errors(gr: Any) -> Any:
    """What a user sees of a handler's errors: our friendly messages, Gradio's with any path
    removed, and for anything else a plain apology (the details go to the server log)."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def handler(*args: Any) -> Any:
            try:
                return fn(*args)
            except ImageRefused as exc:
                raise gr.Error(str(exc)) from None
            except gr.Error as exc:
                raise gr.Error(scrub(str(exc.message))) from None
            except Exception:
                log.exception("%s failed", fn.__name__)
                raise gr.Error(SERVER_ERROR) from None

        return handler

    return wrap


def _guard_image_preprocess(component: Any, gr: Any) -> None:
    """Turn Gradio's own decode failure on a non-image upload into a friendly message."""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        from PIL import Image

        try:
            return original(payload)
        except gr.Error as exc:
            raise gr.Error(scrub(str(exc.message))) from None
        except Image.DecompressionBombError:  # Gradio opens the header; Pillow's own cap
            raise gr.Error(
                _too_big(None, None, _env_int("FRESHNET_MAX_PIXELS", MAX_PIXELS))
            ) from None
        except Exception:  # noqa: BLE001 - whatever the decoder raises, the user sees one message
            raise gr.Error(NOT_AN_IMAGE) from None

    component.preprocess = preprocess


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    import torch

    concurrency = int(os.environ.get("FRESHNET_CONCURRENCY", "4"))
    # Requests already run in parallel: more intra-op threads than cores per request only thrash.
    threads = int(os.environ.get("FRESHNET_TORCH_THREADS", "0")) or max(
        1, (os.cpu_count() or 1) // concurrency
    )
    torch.set_num_threads(threads)
    started = time.monotonic()
    demo = build_demo(HERE)
    demo.queue(
        default_concurrency_limit=concurrency,
        max_size=int(os.environ.get("FRESHNET_QUEUE_SIZE", "64")),
    )
    log.info("model loaded in %.1f s", time.monotonic() - started)
    if isinstance(getattr(demo, "freshnet_sink", None), HubFeedbackSink):
        # A Space stop (or `freshnet serve` stopping its app) sends SIGTERM: as Ctrl-C it ends
        # launch() cleanly, and the scheduler's exit hook commits the corrections still waiting.
        signal.signal(signal.SIGTERM, _interrupt)
    demo.launch(
        max_file_size=f"{int(os.environ.get('FRESHNET_MAX_UPLOAD_MB', '10'))}mb",
        allowed_paths=[str(HERE / "examples")],
        # Unexpected exceptions show Gradio's plain "Error", never their text (paths, internals);
        # our handlers raise gr.Error with messages meant for users (_user_errors).
        show_error=False,
    )


if __name__ == "__main__":
    main()
