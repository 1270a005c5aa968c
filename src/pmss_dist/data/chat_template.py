"""Chat templates rendered as untrusted code: Jinja's immutable sandbox (no Python objects, no
mutation) with limits on every render, counted rather than timed. A template that does not
compile or runs past a limit is a `ChatTemplateError`, the template's fault, named with its file;
a conversation the template refuses is a row's `TokenizerError`."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from datetime import datetime

from jinja2 import nodes, pass_eval_context
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.runtime import LoopContext, Namespace, markup_join, str_join
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, safe_range
from jinja2.visitor import NodeTransformer

from pmss_dist.errors import ChatTemplateError, TokenizerError

# A chat template is code from a downloaded file, so each render runs under limits. They are
# counts, not a clock: every rank stops at the same point of the same render (a clock could stop
# one rank and leave the others waiting in a collective), on a fast machine or a slow one.
TEMPLATE_MAX_STEPS = 250_000  # loop iterations and calls (macros, filters, tests, methods)
TEMPLATE_MAX_CHARS = 1 << 26  # characters (and list items) one render builds, copies or compares
TEMPLATE_MAX_DEPTH = 64  # calls inside calls: a macro calling itself
TEMPLATE_MAX_INT_BITS = 4096  # far beyond any count or index; bounds what one multiplication costs
# The longest a number prints in a format field: Python prints no int of more digits, and %f no
# float as long.
_NUMBER_CHARS = 4300
# The sandbox's own filters, which the template's syntax tree is rewritten to call (`_Bounded`);
# the space makes them names that a template cannot write.
_COUNTED, _JOINED, _MEASURED = "pmss counted", "pmss joined", "pmss measured"


def _raise_exception(message: str):
    raise TokenizerError(f"chat template refused the conversation: {message}")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with the tokenizer's chat template in Jinja's immutable sandbox (the
    template must not reach Python objects or mutate state), under the limits above."""
    source = tokenizer.chat_template_source
    env, template = _compiled(tokenizer.chat_template, source)
    try:
        return env.render(template, messages=messages, add_generation_prompt=add_generation_prompt,
                          bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    except (ChatTemplateError, TokenizerError):
        raise
    except RecursionError as err:  # nesting (of calls or data) deeper than Python's stack
        raise env.over("nests deeper than Python allows") from err
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as err:
        raise TokenizerError(f"the chat template from {source} failed on this conversation: "
                             f"{type(err).__name__}: {err}") from err


@functools.lru_cache(maxsize=16)
def _compiled(template: str, source: str):
    """The sandbox of one template and the template compiled in it, made once: a dataset renders
    each conversation several times."""
    env = _TemplateSandbox(source)
    try:
        tree = _Bounded().visit(env.parse(template))
        tree.set_environment(env)
        return env, env.from_string(tree)
    except TemplateSyntaxError as err:
        raise ChatTemplateError(f"{source}: line {err.lineno}: {err.message}: correct the chat template") from err
    except RecursionError as err:
        raise ChatTemplateError(f"{source}: the chat template nests too deeply to compile; correct it") from err


class _Bounded(NodeTransformer):
    """Rewrites a template's syntax tree so that what it can repeat without calling anything goes
    through the sandbox's counters: every loop's items, every ``~`` and comparison operand."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = _own_filter(_COUNTED, node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return _own_filter(_JOINED, nodes.Tuple(node.nodes, "load", lineno=node.lineno))

    def visit_Compare(self, node: nodes.Compare) -> nodes.Compare:
        self.generic_visit(node)
        node.expr = _own_filter(_MEASURED, node.expr)
        for operand in node.ops:
            operand.expr = _own_filter(_MEASURED, operand.expr)
        return node


def _own_filter(name: str, node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _TemplateSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox counting what one render does against the limits above: every
    call (`call`), filter and test (`_accounted`) and loop item (`counted`) is a step; what
    operators build (`call_binop`), slices copy (`getitem`), calls take and return, comparisons
    read and the output holds (`concat`) are characters. What one operation would build far
    beyond its inputs (``"x" * 10**9``, ``s.ljust(10**9)``, ``s | indent(10**6)``) is refused
    before it is built."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})  # the operators that can grow a value

    def __init__(self, source: str):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         finalize=self._printed)
        self.source = source  # where the template came from, for messages
        self.steps = self.chars = self.depth = 0
        self._sizes: dict[int, tuple[object, int]] = {}  # id -> (container, size): kept alive, ids stay unique
        self.filters = {name: self._accounted(f, _FILTER_CHECKS.get(name), reads=name not in _SIZE_FILTERS)
                        for name, f in self.filters.items()}
        self.filters.update({_COUNTED: self.counted, _JOINED: _joined, _MEASURED: self.measured})
        self.tests = {name: self._accounted(test) for name, test in self.tests.items()}
        self.policies["json.dumps_function"] = self._json_dumps
        del self.globals["lipsum"]  # unbounded placeholder text, which no chat template needs
        self.globals["range"] = self._range
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def render(self, template, **variables) -> str:
        """One render with fresh counts. Renders of one sandbox run one at a time, as the data
        pipeline makes them (in each rank's main thread)."""
        self.steps = self.chars = self.depth = 0
        try:
            return template.render(**variables)
        finally:
            self._sizes.clear()

    def over(self, what: str) -> ChatTemplateError:
        return ChatTemplateError(f"the chat template from {self.source} {what} in one render, beyond what a "
                                 "chat template needs: correct or replace it")

    def _range(self, *args) -> range:
        """The sandbox's ``range``, whose limit is the template's error as the others are."""
        try:
            return safe_range(*args)
        except OverflowError:
            raise self.over(f"asks for a range of more than {MAX_RANGE:,} numbers") from None

    def spend(self, steps: int = 0, chars: int = 0) -> None:
        self.steps, self.chars = self.steps + steps, self.chars + chars
        if self.steps > TEMPLATE_MAX_STEPS:
            raise self.over(f"runs more than {TEMPLATE_MAX_STEPS:,} loop iterations and calls")
        self.fits(0)

    def fits(self, chars: int) -> None:
        """Refuse, before it is built, what would take the render past its characters."""
        if self.chars + chars > TEMPLATE_MAX_CHARS:
            raise self.over(f"handles more than {TEMPLATE_MAX_CHARS:,} characters")

    def int_fits(self, bits: int) -> None:
        if bits > TEMPLATE_MAX_INT_BITS:
            raise self.over(f"makes a number of more than {TEMPLATE_MAX_INT_BITS} bits")

    def size(self, value) -> int:
        """The characters and items ``value`` holds, through its containers (a list holding one
        long text n times holds n times its length): about as much as printing it makes."""
        if isinstance(value, (str, bytes)):
            return len(value)
        contents = _contents(value)
        if contents is None:
            return 1
        known = self._sizes.get(id(value))
        if known is None:
            known = (value, len(contents) + sum(self.size(item) for item in contents))
            if not isinstance(value, Namespace):  # the one container a template can change
                self._sizes[id(value)] = known
        return known[1]

    def counted(self, items):
        """A loop's items, a step each."""
        for item in items:
            self.spend(steps=1)
            yield item

    def streamed(self, items, extra: int = 0, running: bool = False):
        """``items`` charged as they are read: each its size and ``extra`` (a separator), or with
        ``running``, all read so far (each is appended to a copy of the ones before it)."""
        total = 0
        for item in items:
            total = (total if running else 0) + self.size(item) + extra
            self.spend(chars=total)
            yield item

    def measured(self, value):
        """A comparison's operand, charged what comparing it may read."""
        self.spend(chars=self.size(value))
        return value

    def formatted_size(self, fmt, marker: str, values) -> int:
        """At most how long ``fmt`` is with ``values`` filled in: each field (``marker`` opens one)
        holds at most the widest width or precision (digits in ``fmt``, or a number passed) and
        the largest value or a number."""
        text = fmt.decode("latin-1") if isinstance(fmt, bytes) else str(fmt)
        widths = [int(d) if len(d) <= 18 else TEMPLATE_MAX_CHARS + 1 for d in re.findall(r"\d+", text)]
        widths += [abs(v) for v in values if isinstance(v, int)]
        largest = max((self.size(v) for v in values), default=0)
        return len(text) + text.count(marker) * (max(widths, default=0) + largest + _NUMBER_CHARS)

    def _run(self, run, args: tuple, kwargs: dict, check=None, owner=None, reads: bool = True):
        """One call of ``run``: a step; its arguments (and the ``owner`` of a method) must fit;
        ``check`` (given the owner, then the arguments) refuses what the call would build, or
        returns the arguments to pass instead (an iterable `streamed`); then what the call
        returns is charged, and what it took unless it ``reads`` none of it."""
        self.spend(steps=1)
        mine = () if owner is None else (owner,)
        given = (*mine, *args, *kwargs.values())
        for value in given:
            self.fits(self.size(value))
        if check is not None:
            args, kwargs = check(self, *mine, *args, **kwargs) or (args, kwargs)
        result = run(*args, **kwargs)
        self.spend(chars=(sum(map(_length, given)) if reads else 0) + self.size(result))
        return result

    def _accounted(self, func, check=None, reads: bool = True):
        """A filter or test, run through `_run`."""
        passes_context = getattr(func, "jinja_pass_arg", None) is not None  # Jinja's eval context or environment first

        @functools.wraps(func)
        def accounted(*args, **kwargs):
            context, args = (args[:1], args[1:]) if passes_context else ((), args)
            return self._run(functools.partial(func, *context), args, kwargs, check, reads=reads)

        return accounted

    def call(__self, __context, __obj, *args, **kwargs):  # Jinja's names: no clash with a template's keywords
        """Every call a template makes: macros, methods, globals, ``loop(...)``."""
        self = __self
        if isinstance(__obj, LoopContext):  # a recursive loop's loop(items): its items are a loop's too
            args = tuple(map(self.counted, args))
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)  # the object of a method: a text, a list, ...
        check = _METHOD_CHECKS.get(method.__name__) if isinstance(owner, (str, bytes, int)) else None
        self.depth += 1
        try:
            if self.depth > TEMPLATE_MAX_DEPTH:
                raise self.over(f"nests calls more than {TEMPLATE_MAX_DEPTH} deep")
            return self._run(functools.partial(ImmutableSandboxedEnvironment.call, self, __context, __obj), args,
                             kwargs, check, owner)
        finally:
            self.depth -= 1

    def call_binop(self, context, operator: str, left, right):
        if operator == "%" and isinstance(left, (str, bytes)):
            self.fits(self.formatted_size(left, "%", right if isinstance(right, tuple) else (right,)))
        elif isinstance(left, int) and isinstance(right, int):
            if operator == "*":
                self.int_fits(left.bit_length() + right.bit_length())
            elif operator == "**" and right > 0 and abs(left) > 1:
                self.int_fits(left.bit_length() * right)
        elif operator == "*" and isinstance(right, int) and isinstance(left, _SEQUENCES):
            self.fits(len(left) * right)
        elif operator == "*" and isinstance(left, int) and isinstance(right, _SEQUENCES):
            self.fits(left * len(right))
        elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            self.fits(len(left) + len(right))
        value = super().call_binop(context, operator, left, right)
        self.spend(chars=self.size(value))
        return value

    def getitem(self, obj, argument):
        value = super().getitem(obj, argument)
        if isinstance(argument, slice):  # a copy: messages[::-1], text[:n]
            self.spend(chars=_length(value))
        return value

    def concat(self, pieces) -> str:
        """Joins every buffer a template fills: its output, a macro's, a ``{% set %}`` block's."""
        parts = []
        for piece in pieces:
            self.spend(chars=len(piece))
            parts.append(piece)
        return "".join(parts)

    def _printed(self, value):
        """Jinja's ``finalize``: each ``{{ value }}`` before it becomes text."""
        if not isinstance(value, str):
            self.fits(self.size(value))
        return value

    def _json_dumps(self, value, **options) -> str:
        """``json.dumps`` for the tojson filter, charged as it writes: an indent repeats on every line."""
        chunks = []
        for chunk in json.JSONEncoder(**options).iterencode(value):
            self.spend(chars=len(chunk))
            chunks.append(chunk)
        return "".join(chunks)


_SEQUENCES = (str, bytes, list, tuple)


def _length(value) -> int:
    """What taking ``value`` as a whole may read: its length, for the built-in containers."""
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _contents(value) -> list | None:
    """What a container holds (a mapping: its keys and values; a namespace: its attributes), or None."""
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        return list(value)
    return None


@pass_eval_context
def _joined(eval_ctx, parts: tuple) -> str:
    """``a ~ b``, joined as Jinja joins it once its size fits (a text doubled in a loop does not)."""
    env = eval_ctx.environment
    env.fits(sum(env.size(part) for part in parts))
    text = (markup_join if eval_ctx.volatile or eval_ctx.autoescape else str_join)(parts)
    env.spend(chars=len(text))
    return text


def _whole(value) -> int:
    return value if isinstance(value, int) else 0  # not a number: the call itself fails


def _replaced_length(s, old, new, count=-1) -> int:
    """``len(s.replace(old, new, count))``, without building it."""
    kind = str if isinstance(s, str) else bytes
    if not (isinstance(s, kind) and isinstance(old, kind) and isinstance(new, kind)):
        return _length(s)  # the call fails
    found = s.count(old) if old else len(s) + 1
    return len(s) + (found if count is None or count < 0 else min(found, count)) * (len(new) - len(old))


def _longest_replacement(table) -> int:
    """The longest text that ``str.translate``'s ``table`` puts in for one character."""
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else ()
    return max([1, *(len(v) for v in values if isinstance(v, (str, bytes)))])


# What a method of a text (or an int) would build, refused beyond the limits: (sandbox, the text,
# the method's arguments).
_METHOD_CHECKS = {
    **dict.fromkeys(("center", "ljust", "rjust", "zfill"),
                    lambda env, s, width, *fill: env.fits(max(len(s), _whole(width)))),
    "expandtabs": lambda env, s, tabsize=8: env.fits(len(s) + s.count("\t" if isinstance(s, str) else b"\t")
                                                     * _whole(tabsize)),
    "replace": lambda env, s, old, new, count=-1: env.fits(_replaced_length(s, old, new, count)),
    "translate": lambda env, s, table, *rest: env.fits(len(s) * _longest_replacement(table)),
    "join": lambda env, s, items: ((env.streamed(items, len(s)),), {}),
    "format": lambda env, s, *args, **kwargs: env.fits(env.formatted_size(s, "{", (*args, *kwargs.values()))),
    "format_map": lambda env, s, mapping: env.fits(env.formatted_size(s, "{", (mapping,))),
    "to_bytes": lambda env, n, length=1, *rest, **options: env.fits(_whole(length)),
}

# Filters that read only a value's size, whatever its length: templates ask ``messages | length``
# for every message.
_SIZE_FILTERS = frozenset({"length", "count"})

# The same for the filters that can build far more than they are given, in their template signatures.
_FILTER_CHECKS = {
    "center": lambda env, value, width=80: env.fits(max(env.size(value), _whole(width))),
    "indent": lambda env, s, width=4, first=False, blank=False: env.fits(
        env.size(s) + (str(s).count("\n") + 1) * (len(width) if isinstance(width, str) else _whole(width))),
    "format": lambda env, value, *args, **kwargs: env.fits(
        env.formatted_size(value, "%", (*args, *kwargs.values()))),
    "replace": lambda env, s, old, new, count=None: env.fits(_replaced_length(str(s), str(old), str(new), count)),
    # At worst a line break after every character.
    "wordwrap": lambda env, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True: env.fits(
        env.size(s) * (1 + len(str(wrapstring or "\n")))),
    "batch": lambda env, value, linecount, fill_with=None: env.fits(env.size(value) + _whole(linecount)),
    "slice": lambda env, value, slices, fill_with=None: env.fits(env.size(value) + _whole(slices)),
    # Every few characters a link, with its rel and target attributes.
    "urlize": lambda env, value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None: (
        env.fits(env.size(value) * (3 + (len(str(target or "")) + len(str(rel or "")) + 40) // 4))),
    # An int rounded to -p digits goes through 10 ** p.
    "round": lambda env, value, precision=0, method="common": env.int_fits(
        -precision * 10 // 3 if isinstance(value, int) and isinstance(precision, int) else 0),
    "join": lambda env, value, d="", attribute=None: ((env.streamed(value, len(str(d))), d, attribute), {}),
    # Adding lists copies all the items before each one.
    "sum": lambda env, iterable, attribute=None, start=0: (
        ((env.streamed(iterable, running=True), attribute, start), {}) if isinstance(start, (list, tuple)) else None),
}
