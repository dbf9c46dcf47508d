"""Hugging Face checkpoint import (and, later, export). `from jaxlm.convert import hf`."""
