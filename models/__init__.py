"""etkd.models: one small encoder with swappable attention, HF weight interop, convert and student init.

from etkd.models import load, convert, make_student
model = load("path/to/roberta")                     # ours, or an HF checkpoint of a family in etkd.models.hf.FAMILIES
long = convert(model, to="longformer", max_positions=4096, window=512)
long.set_attention_backend("cpu")                   # or `with etkd_kernels.use_backend("cpu"):`
lsg = load("lsg-dir")                               # lsg-converter's LSGRoberta*/LSGBert* checkpoints (models/lsg.py)
lsg.save_pretrained("out", format="lsg")            # ... and back
"""

from .config import EncoderConfig
from .convert import convert, make_student
from .encoder import Encoder, EncoderModel, EncoderOutput
from .hf import from_hf, to_hf
from .loader import load
from .lsg import load_lsg, save_lsg
from .patterns import PATTERNS, Pattern, get_attention

__all__ = [
    "Encoder",
    "EncoderConfig",
    "EncoderModel",
    "EncoderOutput",
    "PATTERNS",
    "Pattern",
    "convert",
    "from_hf",
    "get_attention",
    "load",
    "load_lsg",
    "make_student",
    "save_lsg",
    "to_hf",
]
