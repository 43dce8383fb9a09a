from types import SimpleNamespace

from cxr_lib.book.sphinx_scripts import unique_scripts


def script(filename, priority=500, **attributes):
    return SimpleNamespace(filename=filename, priority=priority, attributes=attributes)


def test_repeated_scripts_are_dropped_keeping_the_first_in_order():
    thebe = {"body": "const THEBE_JS_URL = 'x'"}
    files = [script("a.js"), script(None, **thebe), script("b.js"), script("", **thebe),
             script("a.js"), script("a.js", priority=200)]
    context = {"script_files": files}
    unique_scripts(None, "intro", "page.html", context, None)
    assert context["script_files"] is files  # edited in place, as Sphinx reads it afterwards
    assert len(files) == 4
    assert [s.filename for s in files] == ["a.js", None, "b.js", "a.js"]
    assert files[3].priority == 200  # same file at another priority is a different entry
