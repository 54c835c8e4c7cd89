"""The encoder stage: T5 (text), CLIP (image), the Wan VAE and wav2vec2 (speech), loaded from the official
files through transformers/diffusers, plus the tiny builders used by tests and the demo."""

from inference.encoders.clip import *  # noqa: F403
from inference.encoders.common import *  # noqa: F403
from inference.encoders.t5 import *  # noqa: F403
from inference.encoders.vae import *  # noqa: F403
