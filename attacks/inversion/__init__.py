"""Gradient inversion: attacks (DLG/iDLG, Inverting Gradients, DIA, GIFD), metrics, benchmark
mode and the in-federation observer. See docs/inversion.md."""

from attacks.inversion.common import Payload
from attacks.inversion.dia import DropoutInversion
from attacks.inversion.dlg import DLG, idlg
from attacks.inversion.gifd import GIFD
from attacks.inversion.ig import InvertingGradients

__all__ = ["Payload", "DLG", "idlg", "InvertingGradients", "DropoutInversion", "GIFD"]
