"""The README's resume-on-another-count paragraph says what docs/failures.md (and the code) do."""
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_says_full_fine_tunes_resume_on_another_count_through_portable_up_to_portable_max_gb():
    """It said a ZeRO/FSDP full fine-tune exits 70 on another count; it resumes from portable/ (docs/failures.md)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    para = readme[readme.index("**Another number of GPUs.**"):readme.index("## Layout")]
    failures = " ".join((ROOT / "docs" / "failures.md").read_text().split())
    assert "full fine-tune under ZeRO or FSDP on another count" not in para
    assert "resilience.portable_max_gb" in para and "resilience.portable_max_gb" in failures
    assert "for full fine-tunes up to `resilience.portable_max_gb`" in para
    assert "| ZeRO-2/3, FSDP, full fine-tune, `portable/` ≤ `resilience.portable_max_gb` | native | `portable/` |" in failures
