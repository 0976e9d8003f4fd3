"""freshnet Space: a Gradio 6 image classifier serving the fastai model.pkl next to this file.

This file is pushed to the Space as-is: it imports nothing from freshnet. Environment:
  GRADIO_SERVER_PORT / GRADIO_SERVER_NAME   where to listen (Gradio's own variables)
  FRESHNET_MAX_UPLOAD_MB                    upload size cap (default 10)
  FRESHNET_CONCURRENCY                      predictions run at once (default 4)
  FRESHNET_TORCH_THREADS                    torch threads (default: cores / concurrency, at least 1)
  FRESHNET_COMPILE                          1 (default): compile the model with torch.compile in the
                                            background; 0: always run the eager model
  FRESHNET_FEEDBACK                         feedback sink: a folder (default ./feedback) or s3://bucket/prefix

Feedback format (read by freshnet's `feedback` source), one pair per correction:
  <sink>/<label>/<id>.jpg    the image as uploaded, re-encoded as RGB JPEG
  <sink>/<label>/<id>.json   {"id", "label", "predicted", "probabilities", "model_version", "time"}
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
NOT_AN_IMAGE = "That file is not an image we can read. Please upload a JPEG, PNG or WebP photo."

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


class FeedbackSink:
    """Writes corrections as <label>/<id>.jpg + <label>/<id>.json to a folder or s3://bucket/prefix."""

    def __init__(self, where: str):
        self.where = where

    def write(self, image_path: str, label: str, predicted: dict[str, float], version: str) -> str:
        from PIL import Image

        fid = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        with Image.open(image_path) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=95)
        record = {
            "id": fid,
            "label": label,
            "predicted": next(iter(predicted), None),
            "probabilities": predicted,
            "model_version": version,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        meta = json.dumps(record, indent=1).encode()
        safe_label = label.replace("/", "_")
        if self.where.startswith("s3://"):
            import boto3  # only needed when the sink is S3

            bucket, _, prefix = self.where[len("s3://") :].partition("/")
            base = f"{prefix.strip('/')}/{safe_label}/{fid}".lstrip("/")
            s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
            s3.put_object(Bucket=bucket, Key=f"{base}.jpg", Body=buf.getvalue())
            s3.put_object(Bucket=bucket, Key=f"{base}.json", Body=meta)
        else:
            folder = Path(self.where) / safe_label
            folder.mkdir(parents=True, exist_ok=True)
            # Image first, record last: a reader that sees the .json finds a complete pair.
            (folder / f"{fid}.jpg").write_bytes(buf.getvalue())
            tmp = folder / f".{fid}.json.tmp"
            tmp.write_bytes(meta)
            tmp.replace(folder / f"{fid}.json")
        return fid


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
    sink = FeedbackSink(os.environ.get("FRESHNET_FEEDBACK") or str(bundle / "feedback"))
    title = meta.get("title") or "freshnet classifier"
    version = str(meta.get("version", "unknown"))
    lock = threading.Lock()

    def classify(path: str | None) -> dict[str, float]:
        if not path:
            raise gr.Error("Please upload a photo first.")
        try:
            return clf.predict(path, top=5)
        except Exception as exc:  # PIL refuses anything that is not a readable image
            log.info("predict refused %s: %s", path, exc)
            raise gr.Error(NOT_AN_IMAGE) from None

    def send_feedback(path: str | None, predicted: dict | None, label: str | None) -> str:
        if not path:
            return "Upload a photo first."
        if not label:
            return "Pick the correct label first."
        # gr.Label hands its value back as {label: confidence}
        probs = (
            {str(k): float(v) for k, v in predicted.items()} if isinstance(predicted, dict) else {}
        )
        with lock:
            sink.write(path, label, probs, version)
        return f"Thanks! Recorded **{label}** for the next training run."

    def metadata() -> dict[str, Any]:
        return meta

    with gr.Blocks(title=title) as demo:
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
    return demo


def _guard_image_preprocess(component: Any, gr: Any) -> None:
    """Turn Gradio's own decode failure on a non-image upload into a friendly message."""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception:
            raise gr.Error(NOT_AN_IMAGE) from None

    component.preprocess = preprocess


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
    demo.launch(
        max_file_size=f"{int(os.environ.get('FRESHNET_MAX_UPLOAD_MB', '10'))}mb",
        allowed_paths=[str(HERE / "examples")],
        show_error=True,
    )


if __name__ == "__main__":
    main()
