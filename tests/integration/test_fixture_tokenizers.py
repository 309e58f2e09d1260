"""The fixtures' CLIP tokenizer folders tokenize as CLIP does: transformers' CLIPTokenizer (what the WebUI's SD1 and
SDXL CLIP-L text encoders use) on the generated vocab.json / merges.txt against open_clip's reference tokenizer
(what the SDXL bigG encoder uses). No WebUI boot needed: only its venv and the fixtures."""
import pytest

from tests.integration import fixtures
from tests.integration.conftest import prepare_fixtures, webui_dirs

PROMPTS = ["a cat", "A photo of an astronaut riding a horse, 4k, highly detailed!!",
           "(masterpiece:1.2), best quality, café naïve", "don't  stop\tbelieving... 123 4567", "<lora:tiny:1> a dog"]


@pytest.mark.parametrize("folder", [f"{fixtures.SD1}-clip", f"{fixtures.SDXL}-clip-l"])
def test_generated_tokenizer_matches_clips(folder):
    transformers = pytest.importorskip("transformers")
    reference = pytest.importorskip("open_clip.tokenizer").SimpleTokenizer()
    made = prepare_fixtures(*webui_dirs())
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(made.folder / folder))
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]  # CLIP's ids of <start>, a, cat, <end>
    for prompt in PROMPTS:
        assert tokenizer(prompt).input_ids[1:-1] == reference.encode(prompt), prompt
