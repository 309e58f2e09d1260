"""The README's sampler × mode table lists exactly the samplers of the WebUI under test."""
from tests.test_readme import sampler_rows


def test_readme_sampler_table_is_the_webuis_sampler_list(webui):
    from modules import sd_samplers

    assert sorted(r[0] for r in sampler_rows()) == sorted(s.name for s in sd_samplers.all_samplers)
