"""DiT-XL/2 + TREAD: half of the tokens bypass blocks 2..24 (of 28)."""
from dit_xl2 import *

routing["routes"] = [(2, 24, 0.5)]
