"""Interoperation with PyTorch and Hugging Face checkpoints: declared name tables, a converter, loaders."""

from xax.interop.hf import config_from_hf as config_from_hf
from xax.interop.hf import config_to_hf as config_to_hf
from xax.interop.hf import hf_folder as hf_folder
from xax.interop.hf import hf_table as hf_table
from xax.interop.hf import load_hf as load_hf
from xax.interop.hf import read_hf_weights as read_hf_weights
from xax.interop.hf import save_hf as save_hf
from xax.interop.state_dict import Chain as Chain
from xax.interop.state_dict import Reshape as Reshape
from xax.interop.state_dict import Rule as Rule
from xax.interop.state_dict import Split as Split
from xax.interop.state_dict import StateDictError as StateDictError
from xax.interop.state_dict import Transform as Transform
from xax.interop.state_dict import Transpose as Transpose
from xax.interop.state_dict import load_state_dict as load_state_dict
from xax.interop.state_dict import read_safetensors as read_safetensors
from xax.interop.state_dict import to_state_dict as to_state_dict
from xax.interop.state_dict import write_safetensors as write_safetensors
