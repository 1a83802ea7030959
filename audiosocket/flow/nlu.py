"""
Rules-based understanding of Brazilian Portuguese at the gate: offline, the default NLU.

Two jobs:
  - L{extract_facts}: from what the visitor said, the four facts the doorman needs (purpose,
    visitor name, apartment, resident name) plus the block/tower when one is named — names
    before or after the apartment, the visitor's own at the end ("…, sou o pai dele,
    Roberto"), speech-recogniser text (no punctuation, lower case, numbers in words) read
    like written text; with the condominium's directory, what it implies too (the apartment
    of a resident named for sure, the only resident of an apartment);
  - L{classify_decision}: whether the resident's answer authorises the visit, refuses it, asks
    who it is, or is unclear.

The resident's answer, the contract (a false "authorized" lets a stranger in; a question asked
again costs seconds, so it is never traded for convenience):
  - Voice authorises only on an unambiguous yes — an entry verb ("pode subir", "pode entrar",
    "manda subir", "deixa entrar", "pode liberar", "libera", "pode abrir") or a plain "sim" /
    "autorizo" / "libera" / "pode" — with no negation anywhere in the reply (colloquial "num",
    post-negation "…não", "nada", "nem" included), not phrased as a question (any "?" or a
    question word), not deferred ("amanhã", "outro dia", "depois", "mais tarde", "outra
    hora"), not conditional ("se…", "só se", "mas…", "desde que", "caso"), not an
    instruction to leave a parcel or send the visitor away ("deixa na portaria", "deixar com
    o porteiro", "manda embora", "manda voltar", "pode desligar", "deixa pra lá", "pode
    esquecer"), no sarcasm ("e eu sou o Papa", "tá maluco", "só que não"), no hedge ("acho",
    "talvez", "sei lá", "pode ser").
  - It is an allowlist: after harmless fillers ("ah", "é", "olha", "então", "bom", "claro",
    "imagina", "beleza", "ok", "tá"...) and an opening greeting (then only before an entry
    verb: "alô, sim" is how a phone is picked up) are set aside, every remaining word must
    belong to a yes phrase. A reply not known to be a yes never authorises.
  - Clear refusals are DENIED; someone asking who it is, or picking up without having heard
    the message ("Alô? Pode falar", "Pois não?"), is WHO; everything else is UNCLEAR and
    asked again (the flow then ends the call as "no_decision"). Between asking again and
    refusing, the rules ask again.
  - Only the words count here; when they count is the flow's part: the answer is read only
    after the question has finished playing (L{audiosocket.flow.call}). Keys 1/2 after the
    question stay the sure path (L{classify_dtmf}). A language model is never asked for the
    decision (L{audiosocket.flow.understand}).

Everything works on words, never on substrings: the original system authorised "não, assim não"
because the text contains "sim". Text is accent-folded and lower-cased for matching (a
transcript may or may not carry accents); names are returned as the visitor said them,
title-cased.

Pure Python, no I/O.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import ClassVar

from attrs import field, fields, frozen
from attrs.validators import in_, optional

from audiosocket.flow.directory import Directory, normalize

VISITA = "visita"
ENTREGA = "entrega"
SERVICO = "servico"
INTENTS = (VISITA, ENTREGA, SERVICO)


@frozen
class Facts:
    """
    What is known about a visit. Every field is optional; the flow asks for what is missing.

    C{intent} is one of L{INTENTS}; C{apartment} is digits ("101"); C{block} is the block or
    tower ("B", "2") when the visitor named one.
    """

    intent: str | None = field(default=None, validator=optional(in_(INTENTS)))
    visitor_name: str | None = None
    apartment: str | None = None
    resident_name: str | None = None
    block: str | None = None

    REQUIRED: ClassVar[tuple[str, ...]] = ("intent", "visitor_name", "apartment", "resident_name")

    def merge(self, other: Facts) -> Facts:
        """
        These facts, with the gaps filled from C{other}: a known value is never overwritten.
        """
        return Facts(
            **{
                a.name: getattr(self, a.name)
                if getattr(self, a.name) is not None
                else getattr(other, a.name)
                for a in fields(Facts)
            }
        )

    @property
    def missing(self) -> tuple[str, ...]:
        """
        The names of the required facts still unknown, in the order the flow asks for them.
        """
        return tuple(name for name in self.REQUIRED if getattr(self, name) is None)


# -- tokens ----------------------------------------------------------------------------------


@frozen
class _Token:
    text: str  # as written, for names
    word: str  # accent-folded, lower-case, for matching

    @property
    def is_word(self) -> bool:
        return self.word[:1].isalnum()

    @property
    def is_digits(self) -> bool:
        return self.word.isdigit()


# A phone number, CPF or similar: six or more digits with separators. Never an apartment.
_LONG_NUMBER = re.compile(r"\+?\(?\d[\d\s().\-]{4,}\d")
_TOKEN = re.compile(r"\d+|[^\W\d_]+|[^\w\s]")


def _drop_long_number(match: re.Match) -> str:
    if sum(c.isdigit() for c in match.group()) > 5:
        return " ; "
    return match.group()


def _tokenize(text: str) -> list[_Token]:
    text = unicodedata.normalize("NFC", text or "")
    text = _LONG_NUMBER.sub(_drop_long_number, text)
    return [_Token(t, normalize(t)) for t in _TOKEN.findall(text)]


def _phrases(*texts: str) -> list[tuple[str, ...]]:
    return [tuple(t.split()) for t in texts]


def _word_matches(word: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return word.startswith(pattern[:-1])
    return word == pattern


def _match_at(tokens: Sequence[_Token], i: int, phrase: Sequence[str]) -> bool:
    """
    Whether the words of C{phrase} (a pattern word ending in * matches by prefix) are the
    tokens starting at C{i}, contiguous.
    """
    if i + len(phrase) > len(tokens):
        return False
    return all(_word_matches(tokens[i + k].word, p) for k, p in enumerate(phrase))


class _Cues:
    """
    Phrases, each with a payload, found by their first word (so a sentence is not matched
    against every phrase at every word). Phrases at the same word come back in the order given.
    """

    def __init__(self, entries: Iterable[tuple[tuple[str, ...], object]]):
        self._by_word: dict[str, list[tuple[tuple[str, ...], object]]] = {}
        self._by_prefix: list[tuple[str, tuple[str, ...], object]] = []
        for phrase, payload in entries:
            first = phrase[0]
            if first.endswith("*"):
                self._by_prefix.append((first[:-1], phrase, payload))
            else:
                self._by_word.setdefault(first, []).append((phrase, payload))

    def at(self, tokens: Sequence[_Token], i: int) -> list[tuple[tuple[str, ...], object]]:
        word = tokens[i].word
        candidates = list(self._by_word.get(word, ()))
        candidates += [(p, x) for prefix, p, x in self._by_prefix if word.startswith(prefix)]
        return [(p, x) for p, x in candidates if _match_at(tokens, i, p)]


# -- numbers ---------------------------------------------------------------------------------

_UNITS = {
    "zero": 0, "um": 1, "uma": 1, "dois": 2, "duas": 2, "tres": 3, "quatro": 4, "cinco": 5,
    "seis": 6, "sete": 7, "oito": 8, "nove": 9,
}  # fmt: skip
_TEENS = {
    "dez": 10, "onze": 11, "doze": 12, "treze": 13, "quatorze": 14, "catorze": 14,
    "quinze": 15, "dezesseis": 16, "dezasseis": 16, "dezessete": 17, "dezassete": 17,
    "dezoito": 18, "dezenove": 19, "dezanove": 19,
}  # fmt: skip
_TENS = {
    "vinte": 20, "trinta": 30, "quarenta": 40, "cinquenta": 50, "cincoenta": 50,
    "sessenta": 60, "setenta": 70, "oitenta": 80, "noventa": 90,
}  # fmt: skip
_HUNDREDS = {
    "cem": 100, "cento": 100, "duzentos": 200, "duzentas": 200, "trezentos": 300,
    "trezentas": 300, "quatrocentos": 400, "quatrocentas": 400, "quinhentos": 500,
    "quinhentas": 500, "seiscentos": 600, "seiscentas": 600, "setecentos": 700,
    "setecentas": 700, "oitocentos": 800, "oitocentas": 800, "novecentos": 900,
    "novecentas": 900,
}  # fmt: skip
# "meia" (meia dúzia) is 6 when digits are read one by one ("três meia" = 36), and only then:
# alone it is a sock or a half ("meia hora").
_MEIA = "meia"
# Words that are always a digit of their own, never part of a bigger number.
_DIGIT_WORDS = {"zero": 0, _MEIA: 6}
NUMBER_WORDS = frozenset(_UNITS) | set(_TEENS) | set(_TENS) | set(_HUNDREDS) | {"mil", _MEIA}

# Order of magnitude of each kind of word: a word joins the number being built only if it is
# smaller than everything already in it ("mil" > "duzentos" > "vinte" > "um").
_THOUSANDS, _HUNDRED, _TEN, _TEEN, _UNIT = 4, 3, 2, 1.5, 1


def _kind(word: str) -> tuple[float, int] | None:
    if word in _UNITS:
        return _UNIT, _UNITS[word]
    if word in _TEENS:
        return _TEEN, _TEENS[word]
    if word in _TENS:
        return _TEN, _TENS[word]
    if word in _HUNDREDS:
        return _HUNDRED, _HUNDREDS[word]
    if word == "mil":
        return _THOUSANDS, 1000
    return None


def _chunks(words: Sequence[str]) -> list[int] | None:
    """
    Split number words into the numbers they say: C{["cento", "e", "dois"]} is C{[102]},
    C{["dois", "zero", "um"]} is C{[2, 0, 1]} (digits read one by one), C{["doze", "zero",
    "um"]} is C{[12, 0, 1]}. C{None} if the words are not a number ("e" at an edge, "e"
    between two numbers that do not combine, a word that is not a number).
    """
    chunks: list[int] = []
    value = 0
    smallest: float | None = None  # magnitude of the smallest part of the current number
    closed = True  # the current number takes no more parts (none started, "zero", "meia")
    after_e = False
    for word in words:
        if word == "e":
            if smallest is None or closed or after_e:
                return None
            after_e = True
            continue
        if word in _DIGIT_WORDS or word.isdigit():
            if after_e:
                return None
            if smallest is not None:
                chunks.append(value)
            chunks.append(_DIGIT_WORDS[word] if word in _DIGIT_WORDS else int(word))
            value, smallest, closed = 0, None, True
            continue
        kind = _kind(word)
        if kind is None:
            return None
        magnitude, amount = kind
        if magnitude == _THOUSANDS and not closed and smallest is not None:
            # "dois mil", "doze mil": what came before multiplies the thousand.
            if after_e or smallest == _THOUSANDS:
                return None  # "dois e mil", "mil mil"
            value, smallest = value * 1000, _THOUSANDS
            continue
        joins = (
            not closed
            and smallest is not None
            and smallest != _TEEN  # "doze um" is two numbers
            and magnitude < smallest
        )
        if joins and magnitude == _TEEN and smallest not in (_HUNDRED, _THOUSANDS):
            joins = False  # "vinte doze" is two numbers
        if joins:
            value += amount
            smallest = magnitude
        else:
            if after_e:
                return None  # "vinte e cem": the "e" joins nothing
            if smallest is not None:
                chunks.append(value)
            value, smallest, closed = amount, magnitude, False
        after_e = False
    if after_e:
        return None
    if smallest is not None:
        chunks.append(value)
    return chunks or None


def _chunks_value(chunks: Sequence[int], words: Sequence[str]) -> str | None:
    if len(chunks) == 1 and _MEIA in words:
        return None
    if len(chunks) == 1:
        return str(chunks[0])
    # Read one by one ("dois zero um", "doze zero um"): the parts are written side by side.
    return str(int("".join(str(c) for c in chunks)))


def spoken_number(words: str | Iterable[str]) -> int | None:
    """
    The number said in Portuguese words, or C{None} if they are not one.

    Compositional ("cento e dois" = 102, "mil e duzentos" = 1200, "duzentas e uma" = 201) and
    digit by digit ("dois zero um" = 201, "três meia" = 36: "meia" is 6 only there). C{words}
    is a string or a sequence of words; accents and case do not matter.
    """
    if isinstance(words, str):
        words = words.split()
    folded = [normalize(w) for w in words]
    folded = [w for w in folded if w]
    if not folded:
        return None
    chunks = _chunks(folded)
    if chunks is None:
        return None
    value = _chunks_value(chunks, folded)
    return None if value is None else int(value)


# -- intent ----------------------------------------------------------------------------------

# (weight, phrase): the intent with the strongest cue wins, the earliest on a tie. Strong cues
# name the purpose ("encomenda", "técnico", "visitar"); weak ones only hint at it ("pizza",
# "internet", "amiga"), so "vim visitar minha mãe, trouxe uma pizza" is a visit.
_INTENT_CUES: dict[str, list[tuple[int, tuple[str, ...]]]] = {
    ENTREGA: [(3, p) for p in _phrases(
        "entreg*", "encomend*", "pacote*", "correio*", "sedex", "ifood", "rappi", "delivery",
        "uber eats", "mercado livre", "ze delivery", "amazon", "shopee", "loggi", "jadlog", "magalu",
        "aliexpress", "shein", "carteiro*", "motoboy*", "correspondencia*", "vim trazer",
        "vim deixar", "mercadoria*", "caixa do correio",
    )] + [(2, p) for p in _phrases(
        "trouxe uma", "trouxe um", "trouxe o", "trouxe a", "comida", "pizza*", "lanche*",
        "marmita*", "pedido", "encomendou", "compra*", "remedio*", "farmacia", "flores",
        "botijao",
    )] + [(1, p) for p in _phrases(
        "caixa", "caixas", "presente", "gas",
    )],  # fmt: skip
    SERVICO: [(3, p) for p in _phrases(
        "servico*", "tecnico*", "tecnica*", "consert*", "manutenc*", "instalac*", "instalar",
        "reparo*", "reparar", "faxina*", "faxineir*", "diarista*", "eletricista*",
        "encanador*", "pintor*", "pintura", "pedreiro*", "marceneiro*", "jardineiro*",
        "piscineiro*", "chaveiro*", "dedetiz*", "vistoria", "orcamento", "reforma", "obra",
        "mudanca", "frete", "carreto", "prestador*", "manicure", "cabeleireir*", "baba",
        "montador*", "montagem", "vim montar",
        "cuidador*", "vim arrumar", "vim limpar",
    )] + [(2, p) for p in _phrases(
        "personal", "empregada", "domestica", "cozinheira", "passadeira", "folguista",
        "motorista particular", "acompanhante",
    )] + [(1, p) for p in _phrases(
        "vim fazer",
        "internet", "wifi", "vazamento", "ar condicionado", "limpeza", "leitura", "medidor",
    )],  # fmt: skip
    VISITA: [(3, p) for p in _phrases(
        "visit*",
    )] + [(2, p) for p in _phrases(
        "vim ver", "vim falar com", "me esperando", "me aguardando", "esta esperando",
        "ta esperando", "combinei com", "convidad*", "me chamou", "me convidou", "vim buscar",
        "vim pegar", "esqueci", "perdi a chave", "perdi minha chave", "perdi o cartao",
        "sou morador*", "moro no", "moro na", "moro aqui",
    )] + [(1, p) for p in _phrases(
        "falar com", "amig*", "parente*", "mae", "pai", "irmao", "irma", "namorad*", "filho",
        "filha", "tio", "tia", "primo", "prima", "avo", "sogro", "sogra", "cunhad*",
        "esposa", "marido", "neto", "neta", "afilhad*", "madrinha", "padrinho", "colega",
        "festa", "aniversario", "churrasco", "ver", "reuniao", "vim jogar", "vim estudar",
        "vim brincar", "vim almocar", "vim jantar",
    )],  # fmt: skip
}
_NEGATORS = frozenset({"nao", "nem", "nunca", "jamais"})


def _negated(tokens: Sequence[_Token], i: int) -> bool:
    """
    Whether the cue at C{i} is denied ("não é entrega", "não sou técnico"): a negation among
    the two words before it, in the same clause. "Não, é entrega" keeps its entrega.
    """
    for k in range(i - 1, max(-1, i - 3), -1):
        if not tokens[k].is_word:
            return False
        if tokens[k].word in _NEGATORS:
            return True
    return False


_INTENT_INDEX = _Cues(
    (phrase, (intent, weight))
    for intent, cues in _INTENT_CUES.items()
    for weight, phrase in cues
)


def _intent(tokens: Sequence[_Token]) -> str | None:
    best: dict[str, tuple[int, int]] = {}  # intent -> (weight, first position)
    for i in range(len(tokens)):
        if not tokens[i].is_word:
            continue
        for _, (intent, weight) in _INTENT_INDEX.at(tokens, i):
            if not _negated(tokens, i):
                old_weight, first = best.get(intent, (0, i))
                best[intent] = (max(weight, old_weight), min(first, i))
    if not best:
        return None
    return max(best, key=lambda intent: (best[intent][0], -best[intent][1]))


# -- names -----------------------------------------------------------------------------------

_PARTICLES = frozenset({"da", "de", "do", "das", "dos"})
_ARTICLES = frozenset({"o", "a"})
_TITLES = frozenset(
    {
        "dona", "seu", "senhor", "senhora", "sr", "sra", "srta", "doutor", "doutora", "dr", "dra",
        "familia",
    }
)  # fmt: skip
_KINSHIP = (
    "amigo amiga amigos amigas parente mae pai irmao irma namorado namorada filho filha tio tia "
    "primo prima avo sogro sogra cunhado cunhada esposa marido neto neta afilhado afilhada "
    "colega funcionario funcionaria empregada sobrinho sobrinha"
).split()
# People who work for a resident: "a babá da Clara", "o motorista do seu Paulo".
_ROLES = (
    "baba diarista faxineira cuidadora cuidador enfermeira enfermeiro professor professora"
    " personal motorista secretaria"
).split()
# Words that are never (part of) a person's name here. Anything else after a name cue is taken
# as a name; the intent cues and number words are added below.
_NOT_NAMES = frozenset(
    (
        "a o as os um uma uns umas e ou de da do das dos em no na nos nas num numa ao aos"
        " para pra pro pras pros com sem por pelo pela que se ja so mas entao ne ai ali la"
        " aqui agora hoje tambem mesmo muito bem bom boa dia tarde noite oi ola alo opa tudo"
        " obrigado obrigada favor licenca desculpa eu ele ela eles elas voce voces nos me te"
        " lhe meu minha meus minhas seu sua seus suas dele dela deles esse essa isso este"
        " esta isto aquele aquela sim nao talvez"
        " vim venho vou vai fui estou to tou tava estava esta ta sou somos e era quero queria"
        " gostaria preciso precisa posso pode tenho tem trouxe trago chegou cheguei chegando"
        " falar falando ver buscar pegar levar deixar fazer trazer entregar visitar consertar"
        " instalar arrumar limpar esperando aguardando procurando procuro chamar chama"
        " mora morador moradora moradores vizinho vizinha condominio portaria porteiro"
        " portao interfone sindico zelador administradora empresa casa apartamento apto ap"
        " apt unidade bloco torre predio edificio andar numero terreo cobertura garagem"
        " entregador entregadora motorista mototaxi uber taxi app aplicativo"
        " net vivo claro tim sky oi correios sabesp enel light cemig copasa comgas gas luz"
        " agua mercado supermercado padaria drogaria pizzaria restaurante lanchonete loja"
        " problema vazamento chuveiro torneira geladeira maquina fogao tv televisao sinal"
        " cliente pessoa pessoal equipe gente senhor senhora moca moco rapaz menino menina"
        " crianca fora dentro cima baixo frente tras perto longe direto logo rapidinho ar"
        " condicionado lavar roupa chave porta janela parede teto cozinha banheiro sala quarto"
        " faculdade escola trabalho igreja academia clube botijao documento documentos"
        " pediu encomendou comprou chamou contratou marcou mandou convidou"
        " dona seu doutor doutora dr dra sr sra srta familia reuniao"
    ).split()
    + _KINSHIP
    + _ROLES
)


_RELATIONS = frozenset(_KINSHIP + _ROLES)

# Kinship words that are also surnames after a first name: "José Carlos Filho", "João Neto".
_KIN_SURNAMES = frozenset({"filho", "neto", "sobrinho", "junior"})


# One-word intent cues are not names either ("sou o eletricista").
_CUE_WORDS = frozenset(
    p[0] for cues in _INTENT_CUES.values() for _, p in cues if len(p) == 1 and "*" not in p[0]
)
_CUE_PREFIXES = tuple(
    p[0][:-1] for cues in _INTENT_CUES.values() for _, p in cues if len(p) == 1 and "*" in p[0]
)


# Brands whose first word is also a first name: "o pedido do Zé Delivery".
_BRANDS = _phrases("ze delivery")


def _starts_brand(tokens: Sequence[_Token], i: int) -> bool:
    return any(_match_at(tokens, i, brand) for brand in _BRANDS)


def _is_name_word(token: _Token) -> bool:
    word = token.word
    return not (
        len(word) < 2
        or not word.isalpha()
        or word in _NOT_NAMES
        or word in NUMBER_WORDS
        or word in _CUE_WORDS
        or word.startswith(_CUE_PREFIXES)
    )


def _title(token: _Token) -> str:
    if token.word in _PARTICLES:
        return token.word
    text = token.text.lower()
    return text[:1].upper() + text[1:]


@frozen
class _Name:
    text: str
    start: int  # first token of the name
    end: int  # one past the last token of the name


def _take_name(
    tokens: Sequence[_Token], i: int, stop: int | None = None, max_words: int = 3
) -> _Name | None:
    """
    The name starting at (or, after an article and a form of address, just after) token C{i}
    and ending before C{stop}: up to C{max_words} name words, with particles ("da", "dos")
    inside when a name word follows them. "pedro da silva do 101" gives "Pedro da Silva";
    "maria do ifood" gives "Maria".
    """
    n = len(tokens) if stop is None else stop
    if i < n and tokens[i].word in _ARTICLES:
        i += 1
    if i < n and tokens[i].word in _TITLES:
        i += 1
        if i < n and tokens[i].word == ".":
            i += 1
    parts: list[int] = []
    content = 0
    j = i
    while j < n and content < max_words:
        token = tokens[j]
        if _starts_brand(tokens, j):
            break
        if token.word in _PARTICLES and content and j + 1 < n and _is_name_word(tokens[j + 1]):
            parts.append(j)
        elif _is_name_word(token) or (content and token.word in _KIN_SURNAMES):
            parts.append(j)
            content += 1
        else:
            break
        j += 1
    if not content:
        return None
    return _Name(" ".join(_title(tokens[k]) for k in parts), parts[0], parts[-1] + 1)


def _name_before(tokens: Sequence[_Token], i: int) -> _Name | None:
    """
    The name just before token C{i} ("... Pedro Souza falando").
    """
    start = i
    content = 0
    while start > 0 and content < 3:
        token = tokens[start - 1]
        if _is_name_word(token):
            content += 1
        elif not (
            token.word in _PARTICLES and content and start >= 2 and _is_name_word(tokens[start - 2])
        ):
            break
        start -= 1
    if not content:
        return None
    return _take_name(tokens, start, stop=i)


_SENTENCE_ENDS = frozenset({".", "!", "?", ";", ":"})


def _capitalises_names(tokens: Sequence[_Token]) -> bool:
    """
    Whether the text capitalises words inside sentences (as Whisper does for names), so that
    a lower-case word there is evidence against a name. All-lower-case text (Vosk, a typist in
    a hurry) and sentence-initial capitals say nothing.
    """
    sentence_start = True
    for token in tokens:
        if not token.is_word:
            sentence_start = sentence_start or token.word in _SENTENCE_ENDS
            continue
        if not sentence_start and token.text[:1].isupper() and not token.text.isupper():
            return True
        sentence_start = False
    return False


_VISITOR_CUES = _Cues(
    (p, None)
    for p in _phrases(
        "meu nome e", "meu nome", "me chamo", "sou eu ,", "sou eu", "sou", "aqui e",
        "aqui quem fala e", "quem fala e", "quem fala", "aqui fala",
    )
)  # fmt: skip
# "É o Pedro" names the visitor only at the start of what they say ("oi, é o Pedro"): later
# in a sentence "é o" is anything ("o apartamento é o 101").
_OPENING_FILLERS = frozenset(
    "oi ola alo opa bom boa dia tarde noite tudo bem ai eae entao".split()
)


# "sou o pai dele, Roberto": a relation to someone already named, then the visitor's name.
_OF_HIM = frozenset({"dele", "dela", "deles", "delas"})


def _name_after_relation(tokens: Sequence[_Token], i: int) -> _Name | None:
    """
    After "sou" at C{i - 1}: "o pai dele, Roberto" gives "Roberto" (never "o irmão do
    Felipe", where the name is the resident's).
    """
    n = len(tokens)
    if i < n and tokens[i].word in _ARTICLES:
        i += 1
    if not (i + 1 < n and tokens[i].word in _RELATIONS and tokens[i + 1].word in _OF_HIM):
        return None
    i += 2
    while i < n and tokens[i].word in {",", "-", "o", "a", "eu", "sou"}:
        i += 1
    return _take_name(tokens, i)


def _visitor_name(tokens: Sequence[_Token]) -> _Name | None:
    for i, token in enumerate(tokens):
        if not token.is_word:
            continue
        for cue, _ in _VISITOR_CUES.at(tokens, i):
            name = _take_name(tokens, i + len(cue))
            if name is None and cue == ("sou",):
                name = _name_after_relation(tokens, i + 1)
            if name is not None:
                return name
        if (
            token.word == "e"
            and i + 1 < len(tokens)
            and tokens[i + 1].word in _ARTICLES
            and all(not t.is_word or t.word in _OPENING_FILLERS for t in tokens[:i])
        ):
            name = _take_name(tokens, i + 1)
            if name is not None:
                return name
        if token.word == "falando":
            name = _name_before(tokens, i)
            if name is not None:
                return name
    return _closing_name(tokens)


def _closing_name(tokens: Sequence[_Token]) -> _Name | None:
    """
    "Moro no 302, esqueci a chave, é o Rafael": "é o <name>" as the last clause of what was
    said, after a pause (punctuation) — how a visitor signs off with his name.
    """
    words = [k for k, t in enumerate(tokens) if t.is_word]
    # In a transcript with accents, "e" is "and" ("a Patrícia, e o Ricardo"), "é" is "is".
    accented = any(t.text.lower() != t.word for t in tokens)
    for k in range(len(words) - 2, 0, -1):
        i = words[k]
        if (
            tokens[i].word == "e"
            and (tokens[i].text.lower() == "é" or not accented)
            and tokens[i + 1].word in _ARTICLES
            and not tokens[i - 1].is_word
        ):
            name = _take_name(tokens, i + 1)
            if name is not None and all(not t.is_word for t in tokens[name.end :]):
                return name
            return None
    return None


# Cues right before the resident's name: "para a Ana", "falar com o seu José", "amiga da
# Ana", "encomenda em nome de Ana Souza", "casa da dona Maria", "a dona Maria".
_RESIDENT_CUES = _Cues((p, None) for p in _phrases(
    "para", "pra", "pro", "falar com", "procurando", "procuro", "visitar", "chamar",
    "chama", "combinei com", "casa da", "casa do", "casa de", "nome de", "nome da", "nome do", "morador",
    "moradora", "encomenda da", "encomenda do", "encomenda de", "encomendas da",
    "encomendas do", "pacote da", "pacote do", "pacote de", "entrega da", "entrega do",
    "pedido da", "pedido do", "correspondencia da", "correspondencia do", "aniversario da",
    "aniversario do", "festa da", "festa do", "churrasco da", "churrasco do",
    "dona", "seu", "senhora", "senhor", "doutor", "doutora",
) + [(k, p) for k in _KINSHIP + _ROLES for p in ("da", "do", "de")])  # fmt: skip
# Weaker cues, often followed by a thing rather than a person ("vim ver o vazamento"): in text
# that capitalises names, the word after them must be capitalised.
_WEAK_RESIDENT_CUES = _Cues((p, None) for p in _phrases("ver") + [(k,) for k in _KINSHIP])
# Verbs whose subject, in what a visitor says, is the resident: "a Ana tá me esperando",
# "o Carlos pediu uma pizza", "o Caio está em casa?".
_RESIDENT_VERBS = _Cues((p, None) for p in _phrases(
    "ta me esper*", "esta me esper*", "ta me aguard*", "esta me aguard*", "me chamou",
    "me convidou", "me pediu", "pediu", "encomendou", "comprou", "chamou", "contratou",
    "marcou", "mora", "ta em casa", "esta em casa", "ta ai", "esta ai", "se encontra",
))  # fmt: skip
# "... da Ana do 101": a name right before the apartment, after one of these.
_BEFORE_APARTMENT = frozenset({"da", "do", "de", "a", "o"})
_APARTMENT_LINKS = frozenset({"do", "da", "no", "na", "de"})
# "... do 101, da Ana", "pro 302 pro Rafael": a name right after the apartment.
_AFTER_APARTMENT = frozenset({"da", "do", "pra", "pro", "para"})


def _resident_name(
    tokens: Sequence[_Token], visitor: _Name | None, runs: Sequence[_Run]
) -> _Name | None:
    run_starts = {run.start for run in runs}
    cased = _capitalises_names(tokens)

    def usable(name: _Name | None, weak: bool) -> bool:
        if name is None:
            return False
        if visitor is not None and name.start < visitor.end and visitor.start < name.end:
            return False
        return not (weak and cased and not tokens[name.start].text[:1].isupper())

    def before_apartment(name: _Name | None) -> bool:
        return (
            name is not None
            and name.end + 1 < len(tokens)
            and tokens[name.end].word in _APARTMENT_LINKS
            and (name.end + 1 in run_starts or tokens[name.end + 1].word in _UNIT_CUES)
        )

    # "Entrega pro cento e um, da Ana": the name right after the apartment.
    after_apartment: _Name | None = None
    for run in runs:
        j = run.end
        while j < len(tokens) and not tokens[j].is_word:
            j += 1
        if j < len(tokens) and tokens[j].word in _AFTER_APARTMENT:
            name = _take_name(tokens, j + 1)
            if usable(name, weak=True):
                after_apartment = name
                break

    for i, token in enumerate(tokens):
        if not token.is_word:
            continue
        if after_apartment is not None and i >= after_apartment.start - 1:
            return after_apartment
        if visitor is not None and visitor.start - 1 <= i < visitor.end:
            continue  # "sou o Pedro da Silva": not "Silva"
        for cue, _ in _RESIDENT_CUES.at(tokens, i):
            name = _take_name(tokens, i + len(cue))
            if usable(name, weak=False):
                return name
        for cue, _ in _WEAK_RESIDENT_CUES.at(tokens, i):
            name = _take_name(tokens, i + len(cue))
            if usable(name, weak=True):
                return name
        if _RESIDENT_VERBS.at(tokens, i):
            name = _name_before(tokens, i)
            if usable(name, weak=True):
                return name
        if token.word in _BEFORE_APARTMENT:
            name = _take_name(tokens, i + 1)
            if before_apartment(name) and usable(name, weak=token.word in _ARTICLES):
                return name
    return after_apartment


# -- apartment and block ---------------------------------------------------------------------

_UNIT_CUES = frozenset(
    {"apartamento", "apartamentos", "apto", "apt", "ap", "apart", "unidade", "casa"}
)
_BLOCK_CUES = frozenset({"bloco", "bl", "torre", "predio", "edificio"})
# Between a cue and its number: "apartamento número 101", "ap. 33", "apto nº 12".
_CUE_GAP = frozenset({".", ":", "#", "-", "numero", "n", "no"})
_ABBREVIATED_NUMERO = frozenset({"n", "no"})
_LETTERS = {
    "a": "A", "b": "B", "be": "B", "c": "C", "ce": "C", "d": "D", "de": "D", "e": "E",
    "f": "F", "efe": "F", "g": "G", "ge": "G", "h": "H", "aga": "H",
}  # fmt: skip
# A number followed by one of these counts something; it is not an apartment.
_COUNTED = frozenset(
    (
        "hora horas h minuto minutos min segundo segundos dia dias ano anos mes meses real"
        " reais pessoa pessoas caixa caixas volume volumes pacote pacotes encomenda encomendas"
        " item itens vez vezes kg quilo quilos unidades sacola sacolas pizza pizzas food pop"
    ).split()
)
_NOT_BEFORE_APARTMENT = frozenset({"sedex", "as"})  # "sedex 10", "às dez"
# What may surround a small bare number that is the whole answer ("é o 5", "no cinco").
_ANSWER_FILLERS = frozenset(
    "e o a no na do da pro pra para ao eu numero oi apartamento".split()
)
# Separators allowed between digits read one by one: "2, 0, 1" / "dois-zero-um".
_DIGIT_SEPARATORS = frozenset({",", "-", "."})


@frozen
class _Run:
    start: int  # first token
    end: int  # one past the last token
    chunks: tuple[int, ...]
    words: tuple[str, ...]  # the number words, or () for digits


_SINGLE_DIGIT_WORDS = frozenset(_UNITS) | {_MEIA}


def _is_single_digit(token: _Token) -> bool:
    return (token.is_digits and len(token.word) == 1) or token.word in _SINGLE_DIGIT_WORDS


def _number_runs(tokens: Sequence[_Token]) -> list[_Run]:
    """
    Every stretch of tokens that says a number: digits ("101", "1.201", "1 0 1") or words
    ("cento e um", "dois zero um"). Digit and word stretches are kept apart.
    """
    runs: list[_Run] = []
    n = len(tokens)
    i = 0
    while i < n:
        token = tokens[i]
        if token.is_digits:
            j = i + 1
            if (
                j + 1 < n
                and tokens[j].word == "."
                and tokens[j + 1].is_digits
                and len(tokens[j + 1].word) == 3
            ):
                runs.append(_Run(i, j + 2, (int(token.word + tokens[j + 1].word),), ()))
                i = j + 2
                continue
            end = j
            if len(token.word) == 1:
                while True:
                    k = end
                    if k < n and tokens[k].word in _DIGIT_SEPARATORS:
                        k += 1
                    if k < n and tokens[k].is_digits and len(tokens[k].word) == 1:
                        end = k + 1
                    else:
                        break
            digits = [int(t.word) for t in tokens[i:end] if t.is_digits]
            runs.append(_Run(i, end, tuple(digits), ()))
            i = end
            continue
        if token.word in NUMBER_WORDS:
            run = _spoken_run(tokens, i)
            if run is not None:
                runs.append(run)
                i = run.end
                continue
        i += 1
    return runs


def _spoken_run(tokens: Sequence[_Token], i: int) -> _Run | None:
    n = len(tokens)
    # Gather the longest stretch of number words, "e" between them, and separators between
    # digits read one by one; then keep the longest prefix that is a number.
    taken = [i]
    j = i + 1
    while j < n:
        word = tokens[j].word
        if word in NUMBER_WORDS:
            taken.append(j)
            j += 1
        elif word == "e" and j + 1 < n and tokens[j + 1].word in NUMBER_WORDS:
            taken.append(j)
            j += 1
        elif (
            word in _DIGIT_SEPARATORS
            and j + 1 < n
            and _is_single_digit(tokens[j - 1])
            and _is_single_digit(tokens[j + 1])
        ):
            j += 1
        else:
            break
    while taken:
        words = [tokens[k].word for k in taken]
        chunks = _chunks(words)
        if chunks is not None and _chunks_value(chunks, words) is not None:
            return _Run(i, taken[-1] + 1, tuple(chunks), tuple(words))
        taken.pop()
    return None


def _previous_word(tokens: Sequence[_Token], i: int) -> str | None:
    """
    The cue word before token C{i}, looking past "número", "nº" and punctuation:
    "apartamento" for "apartamento número 101" and "ap. 33".
    """
    k = i - 1
    while k >= 0 and k >= i - 4 and tokens[k].word in _CUE_GAP:
        if tokens[k].word in _ABBREVIATED_NUMERO and not (
            k >= 1 and tokens[k - 1].word in _UNIT_CUES | {"."}
        ):
            break  # "no 101" is "in 101", not "nº 101"
        k -= 1
    if k < 0:
        return None
    return tokens[k].word


def _apartment_and_block(
    tokens: Sequence[_Token], runs: Sequence[_Run]
) -> tuple[str | None, str | None]:
    """
    The apartment and the block named in C{tokens}, given their number runs.

    A number after "apartamento"/"apto"/"ap"/"casa", or right after the block, is the
    apartment; failing that, the first other number that is not a count ("2 caixas"), a time
    ("às 10"), "sedex 10", or a small spoken number that is probably an article ("um"). The
    first number after "bloco"/"torre" is the block, as is a letter ("bloco B").
    """
    block: str | None = None
    hard: list[str] = []  # numbers after "apartamento", "ap", a block...
    soft: list[tuple[_Run, str]] = []
    block_end = -1  # a number right after the block is the apartment

    for i, token in enumerate(tokens):
        if block is None and token.word in _BLOCK_CUES and i + 1 < len(tokens):
            letter = _LETTERS.get(tokens[i + 1].word)
            if letter is not None:
                block = letter
                block_end = i + 2

    for run in runs:
        prev_word = _previous_word(tokens, run.start)
        chunks = list(run.chunks)
        words = list(run.words)
        if prev_word in _BLOCK_CUES:
            if block is None:
                block = str(chunks[0])
            block_end = run.end
            chunks = chunks[1:]
            words = words[1:] if words else words
            if not chunks:
                continue
            is_hard = True
        else:
            # "apartamento 101", or a number right after the block ("bloco B 101").
            is_hard = prev_word in _UNIT_CUES or run.start == block_end
        if prev_word in _NOT_BEFORE_APARTMENT:
            continue
        if run.end < len(tokens) and tokens[run.end].word in _COUNTED:
            # "cento e um duas caixas": the last number counts the caixas. A lone number
            # counts them too, unless a cue says it is the apartment ("apto 504 encomenda").
            if len(chunks) > 1:
                chunks, words = chunks[:-1], words[:-1]
            elif not is_hard:
                continue
        value = _chunks_value(chunks, words)
        if value is None or len(value) > 5 or int(value) == 0:
            continue
        if is_hard:
            hard.append(value)
        else:
            soft.append((run, value))

    if hard:
        return hard[0], block
    for run, value in soft:
        if not run.words or int(value) >= 10:
            # Written digits are a number for sure; a small spoken one ("um", "duas") is
            # usually an article or a count.
            return value, block
        others = [
            t.word
            for k, t in enumerate(tokens)
            if t.is_word and not run.start <= k < run.end
        ]
        if all(w in _ANSWER_FILLERS for w in others):
            return value, block
    return None, block


# -- facts -----------------------------------------------------------------------------------


def extract_facts(text: str, directory: Directory | None = None) -> Facts:
    """
    The facts in one thing the visitor said.

    Without a C{directory}, names are returned as said, title-cased. With one (see
    L{_with_directory}), the directory completes what the sentence implies: the apartment
    of a resident named for sure, the resident of an apartment where one person lives, a
    resident named anywhere in the sentence, the block written into the apartment's number.
    """
    tokens = _tokenize(text)
    runs = _number_runs(tokens)
    visitor = _visitor_name(tokens)
    apartment, block = _apartment_and_block(tokens, runs)
    resident = _resident_name(tokens, visitor, runs)
    facts = Facts(
        intent=_intent(tokens),
        visitor_name=visitor.text if visitor else None,
        apartment=apartment,
        resident_name=resident.text if resident else None,
        block=block,
    )
    if directory is None:
        return facts
    return _with_directory(facts, tokens, visitor, directory)


# -- asking for a person ---------------------------------------------------------------------

#: What a visitor says to reach a human instead of the machine: "quero falar com o porteiro",
#: "tem um atendente?", "uma pessoa, por favor". Plain "portaria" is not one ("estou na
#: portaria"); "falar com a portaria" is.
_PERSON_CUES = _Cues((p, None) for p in _phrases(
    "porteiro", "porteira", "porteiros", "atendente", "atendentes", "operador", "operadora",
    "recepcionista", "zelador", "zeladora", "uma pessoa", "alguma pessoa", "um humano",
    "uma humana", "ser humano", "pessoa de verdade", "pessoa real", "falar com alguem",
    "falar com a portaria", "chama a portaria", "chamar a portaria", "chame a portaria",
))  # fmt: skip


def asks_for_person(text: str) -> bool:
    """
    Whether the visitor asks for a human ("quero falar com o porteiro", "atendente", "uma
    pessoa"), not denied just before ("não quero atendente" is not).
    """
    tokens = _tokenize(text or "")
    for i in range(len(tokens)):
        if tokens[i].is_word and _PERSON_CUES.at(tokens, i) and not _negated(tokens, i):
            return True
    return False


def _with_directory(
    facts: Facts, tokens: Sequence[_Token], visitor: _Name | None, directory: Directory
) -> Facts:
    """
    C{facts} completed by the directory, only where it is sure (the flow confirms the rest):
      - the apartment said, in the block said when the directory writes blocks ("B101");
      - the resident said, spelled as the directory spells it: within the apartment said
        (approximately), or anywhere when exactly one apartment has someone of that name —
        whose number then is the apartment. An approximate or ambiguous name is kept as
        said, with no apartment: the flow asks "É para Fernanda Souza, do 201?";
      - no name after a cue: a resident's name anywhere in the sentence (not the visitor's);
      - nobody named: the visitor, when he lives in the apartment he named ("sou o Carlos
        do 101, esqueci a chave"), or the apartment's only resident.
    """
    apartment = facts.apartment
    home = None
    if apartment is not None:
        home = directory.apartment_in_block(apartment, facts.block)
        if home is not None:
            apartment = home.number
    resident = facts.resident_name
    if resident is not None:
        match = directory.find_resident(resident, apartment=home) if home is not None else None
        if match is None:
            match = directory.find_resident(resident)
            if match is not None and match.exact:
                if apartment is None:
                    apartment, home = match.apartment.number, match.apartment
            else:
                match = None  # not sure: kept as said, for the flow to confirm
        if match is not None:
            resident = match.resident
    else:
        resident = _named_resident(tokens, visitor, directory, home)
        if resident is not None and home is None and apartment is None:
            found = directory.find_resident(resident)
            if found is not None:
                apartment, home = found.apartment.number, found.apartment
    if resident is None and home is not None:
        if (
            facts.visitor_name is not None
            and facts.intent not in (ENTREGA, SERVICO)
        ):
            own = directory.find_resident(facts.visitor_name, apartment=home, threshold=100)
            if own is not None:
                resident = own.resident
        if resident is None and len(home.residents) == 1:
            resident = home.residents[0]
    return Facts(
        intent=facts.intent,
        visitor_name=facts.visitor_name,
        apartment=apartment,
        resident_name=resident,
        block=facts.block,
    )


def _named_resident(
    tokens: Sequence[_Token], visitor: _Name | None, directory: Directory, home
) -> str | None:
    """
    A resident's name said anywhere in C{tokens} with no cue before it ("Entrega pro cento
    e um, da Ana"), outside the visitor's own name: every word of it found in one resident's
    name (within C{home} when the apartment is known; else in one apartment only).
    """
    for i, token in enumerate(tokens):
        if visitor is not None and visitor.start <= i < visitor.end:
            continue
        if not _is_name_word(token):
            continue
        name = _take_name(tokens, i)
        if name is None:
            continue
        words = [t for t in tokens[name.start : name.end] if _is_name_word(t)]
        if visitor is not None and name.start < visitor.end and visitor.start < name.end:
            continue
        for length in range(len(words), 0, -1):
            said = " ".join(t.word for t in words[:length])
            if home is not None:
                match = directory.find_resident(said, apartment=home, threshold=100)
            else:
                match = directory.find_resident(said, threshold=100)
            if match is not None:
                return match.resident
    return None


def answer_name(text: str) -> str | None:
    """
    The name in a short answer to "qual é o seu nome?": "sou o Pedro" and "meu nome é Ana"
    as in L{extract_facts}, or the first name said ("Marcos Vieira", "Pedro, entrega", "é
    o Zé"). C{None} when there is none, or the answer is too long to be one.
    """
    tokens = _tokenize(text)
    visitor = _visitor_name(tokens)
    if visitor is not None:
        return visitor.text
    words = [t for t in tokens if t.is_word]
    if len(words) > _MAX_ANSWER_WORDS:
        return None
    for i, token in enumerate(tokens):
        if _is_name_word(token):
            name = _take_name(tokens, i)
            return name.text if name is not None else None
    return None


_MAX_ANSWER_WORDS = 8


# -- the resident's decision -----------------------------------------------------------------


class Decision(enum.Enum):
    """
    What the resident answered.
    """

    AUTHORIZED = "authorized"
    DENIED = "denied"
    WHO = "who"  # asks who it is, or for the message again
    UNCLEAR = "unclear"


# Words that are never part of a yes. The yes is an allowlist (L{_YES_UNITS}), so these are
# refused by it anyway; naming them documents what the contract excludes, and a test checks
# that the yes vocabulary never takes one in.
NEVER_YES = frozenset(
    (
        # negation, colloquial "num" and post-negation "...não" included
        "nao num nem nunca jamais nada ninguem nenhum nenhuma negativo"
        # questions
        " quem qual quais como onde quando cade porque pq hein ne"
        # deferral: "amanhã", "outro dia", "outra hora", "depois", "mais tarde"
        " amanha depois outro outra outros mais semana"
        # conditions and reservations: "se", "só se", "mas", "desde que", "caso"
        " se caso mas porem desde so somente apenas contanto exceto"
        # leave a parcel, send the visitor away or make him wait, hang up, forget it
        " portaria porteiro guarita recepcao embaixo embora voltar volta volte desligar"
        " desliga esquecer esquece esperar espera aguardar aguarda"
        # sarcasm and disbelief: "e eu sou o Papa", "tá maluco", "vish"
        " papa maluco maluca doido doida louco louca piada brincadeira zoeira vish"
        # hedges: "acho", "talvez", "sei lá", "pode ser"
        " acho talvez sei ser parece provavelmente depende"
    ).split()
)

# Who may be let in, as the resident says it: "manda ele subir", "libera o rapaz".
_WHO_ENTERS = ("",) + tuple(
    "ele|ela|eles|elas|o rapaz|a moca|o moco|o entregador|a entregadora|o pessoal|a visita"
    "|o visitante|o senhor|a senhora".split("|")
)
# The entry verbs after "pode"/"manda"/"deixa" ("pode subi" and "pode entra" are how it is
# often said and transcribed).
_ENTER = ("subir", "subi", "entrar", "entra")
_LET_IN = ("",) + _WHO_ENTERS[1:] + (
    "a entrada", "o acesso", "a subida", "o portao", "a porta", "pra ele", "pra ela",
)  # fmt: skip
_GATE = ("", "o portao", "a porta", "pra ele", "pra ela", "o portao pra ele", "o portao pra ela")


def _yes_units() -> frozenset[tuple[str, ...]]:
    """
    Every phrase that says yes on its own. A reply authorises only if it is made of these and
    L{_YES_FILLERS} (after an opening greeting), with at least one of these.
    """
    entering: set[str] = set()
    for who in _WHO_ENTERS:
        for verb in _ENTER:
            entering.add(f"{who} pode {verb}")
            for helper in ("mandar", "deixar"):
                entering.add(f"pode {helper} {who} {verb}")
            for command in ("manda", "mande", "deixa", "deixe"):
                entering.add(f"{command} {who} {verb}")
    entering.update(("sobe", "suba", "entra"))
    for what in _LET_IN:
        for verb in ("libera", "libere", "liberem", "pode liberar", "eu libero", "libero"):
            entering.add(f"{verb} {what}")
        for verb in ("autorizo", "eu autorizo", "pode autorizar"):
            if what in ("", "a entrada", "o acesso", "a subida") or what in _WHO_ENTERS:
                entering.add(f"{verb} {what}")
    for gate in _GATE:
        for verb in ("abre", "abra", "pode abrir"):
            entering.add(f"{verb} {gate}")
    # "libera aí", "pode subir aí"
    entering |= {phrase + " ai" for phrase in entering}

    states: set[str] = set()
    for who in _WHO_ENTERS:
        for state in ("liberado", "liberada", "liberados", "autorizado", "autorizada"):
            for verb in ("", "ta", "esta", "fica"):
                states.add(f"{who} {verb} {state}")
    done = {"liberei", "eu liberei", "ja liberei", "autorizei", "eu autorizei", "ja autorizei"}
    plain = {
        "sim", "sim senhor", "sim senhora", "pode", "claro que sim", "claro que pode",
        "logico que sim", "logico que pode",
    }  # fmt: skip
    return frozenset(tuple(p.split()) for p in entering | states | done | plain)


_YES_UNITS = _yes_units()
# Harmless words around a yes: "ah", "é", "olha", "claro", "imagina", "tá bom", "obrigado".
# Alone they are not a yes ("ok", "claro" and "beleza" alone are asked again: a resident
# acknowledging the message has not answered the question).
_YES_FILLERS = frozenset(
    tuple(p.split())
    for p in (
        "ah ahh aah e eh olha entao bom claro imagina beleza blz ok okay ta certo isso opa oba"
        " uhum aham obrigado obrigada brigado brigada valeu perfeito otimo show tranquilo joia"
        " legal ja agora moco moca amigo amiga logico viu"
    ).split()
) | frozenset(
    tuple(p.split())
    for p in (
        "tudo bem", "tudo certo", "ta bom", "ta bem", "ta certo", "com certeza",
        "sem problema", "sem problemas", "por favor",
    )
)  # fmt: skip
# A greeting opens a yes only at the start, and only when a yes follows ("alô, pode subir").
_GREETINGS = frozenset(
    tuple(p.split())
    for p in ("alo", "oi", "ola", "opa", "bom dia", "boa tarde", "boa noite", "e ai", "fala")
)
# Punctuation a yes may carry; anything else ("?", "¿", digits, symbols) is not a plain yes.
_YES_PUNCTUATION = frozenset(".,!;:-")
# A yes too short to stand after a greeting on its own (see L{_made_of_yes}).
_BARE_YES = frozenset({("sim",), ("pode",), ("sim", "senhor"), ("sim", "senhora")})
# What confirms the apartment number the visitor was asked about ("101, correto?").
_CONFIRM_UNITS = _YES_UNITS | frozenset(
    tuple(p.split())
    for p in (
        "isso", "isso mesmo", "isso ai", "correto", "exato", "exatamente", "certo", "confirmo",
        "confirmado", "positivo", "esse", "esse mesmo", "e esse", "e isso", "e esse mesmo",
        "e isso mesmo", "e isso ai", "afirmativo",
    )
)  # fmt: skip


def _longest_phrase(units: frozenset[tuple[str, ...]]) -> int:
    return max(len(u) for u in units)


_MAX_PHRASE = _longest_phrase(_YES_UNITS | _YES_FILLERS | _GREETINGS | _CONFIRM_UNITS)


def _made_of(
    words: Sequence[str],
    units: frozenset[tuple[str, ...]],
    fillers: frozenset[tuple[str, ...]],
) -> bool:
    """
    Whether C{words} split wholly into C{units} and C{fillers}, with at least one unit.
    (Every split is tried, not just the greedy one: "tá liberado" is a unit, "tá" a filler.)
    """
    n = len(words)
    # reach[i]: the set of "a unit has been seen" flags with which position i is reachable.
    reach: list[set[bool]] = [set() for _ in range(n + 1)]
    reach[0].add(False)
    for i in range(n):
        if not reach[i]:
            continue
        for length in range(1, min(_MAX_PHRASE, n - i) + 1):
            phrase = tuple(words[i : i + length])
            if phrase in units:
                reach[i + length].add(True)
            elif phrase in fillers:
                reach[i + length].update(reach[i])
    return True in reach[n]


def _plain_words(tokens: Sequence[_Token]) -> list[str] | None:
    """
    The words of a reply that could be a plain yes, or C{None} when it cannot be one: it
    asks a question ("?"), carries a number or a symbol, or names a L{NEVER_YES} word.
    """
    words: list[str] = []
    for token in tokens:
        if token.is_word and not token.is_digits:
            if token.word in NEVER_YES:
                return None
            words.append(token.word)
        elif not set(token.word) <= _YES_PUNCTUATION:  # "…" folds to "..."
            return None
    return words


def _made_of_yes(words: list[str], units: frozenset[tuple[str, ...]]) -> bool:
    """
    L{_made_of} for a yes: an opening greeting is skipped, but then a bare "sim"/"pode" is
    not enough — "alô, sim" and "oi, pode" are how a phone is picked up (the "?" is often
    lost in transcription); "alô, pode subir" names the entry.
    """
    i = 0
    while True:
        for length in (2, 1):
            if tuple(words[i : i + length]) in _GREETINGS:
                i += length
                break
        else:
            break
    if i == 0:
        return _made_of(words, units, _YES_FILLERS)
    return _made_of(words[i:], units - _BARE_YES, _YES_FILLERS | _BARE_YES)


def is_plain_yes(text: str) -> bool:
    """
    Whether C{text} is an unambiguous yes to "você autoriza a entrada?": made only of yes
    phrases ("sim", "pode", "pode subir", "manda subir", "libera", "tá liberado",
    "autorizo"...) and harmless fillers ("ah", "é", "olha", "claro", "imagina", "tá bom"),
    after an optional opening greeting, with no "?" and no L{NEVER_YES} word.
    """
    words = _plain_words(_tokenize(text))
    if not words:
        return False
    return _made_of_yes(words, _YES_UNITS)


def confirms(text: str) -> bool:
    """
    Whether the visitor's C{text} confirms the apartment number read back to them
    ("Apartamento 101, correto?"): a plain yes (L{is_plain_yes}) or "isso", "correto",
    "exato", "é esse", under the same rules — no negation, no question, nothing else.
    """
    words = _plain_words(_tokenize(text))
    if not words:
        return False
    return _made_of_yes(words, _CONFIRM_UNITS)


# A reply made only of these, with a "?" or a greeting in it, is someone who picked up and
# has not heard the message: "Alô? Pode falar", "Pois não?", "Oi, tudo bem?", "Sim?".
_GO_AHEAD = frozenset(
    tuple(p.split())
    for p in (
        "alo", "oi", "ola", "opa", "pronto", "pois nao", "fala", "diga", "pode falar",
        "pode dizer", "pode mandar", "pode perguntar", "tudo bem", "tudo bom", "bom dia",
        "boa tarde", "boa noite", "e ai", "sim", "quem fala", "quem e", "quem", "e",
        "pois nao", "fale", "estou ouvindo", "to ouvindo", "oi tudo bem", "ta", "ok",
    )
)  # fmt: skip
_GO_AHEAD_OPENERS = frozenset(
    {"alo", "oi", "ola", "pronto", "pois", "fala", "diga", "fale", "falar", "dizer", "ouvindo"}
)


def _only_go_ahead(tokens: Sequence[_Token]) -> bool:
    words = [t.word for t in tokens if t.is_word]
    asked = any(t.word in ("?", "¿") for t in tokens)
    if not (asked or _GO_AHEAD_OPENERS.intersection(words)):
        return False
    return _made_of(words, _GO_AHEAD, frozenset())


_POS, _NEG, _WHO, _NEUTRAL = "<+>", "<->", "<?>", "<~>"

# Set phrases first, longest match wins; each becomes one marker word.
_IDIOMS: list[tuple[tuple[str, ...], str]] = sorted(
    [(p, _WHO) for p in _phrases(
        "quem", "o que", "como", "qual", "que nome", "nao entendi", "nao entendo",
        "nao ouvi", "nao escutei", "nao deu pra ouvir", "nao deu para ouvir",
        "nao deu pra entender", "nao deu para entender", "repete", "repita", "repetir",
        "de novo", "outra vez", "hein", "mais alto", "nome dele", "nome dela", "onde",
        "de onde", "da onde", "que empresa", "qual empresa",
    )]
    + [(p, _POS) for p in _phrases(
        "nao tem problema", "nao ha problema", "sem problema", "sem problemas",
        "problema nenhum", "nenhum problema", "por que nao", "porque nao", "pq nao",
        "claro que sim", "claro que pode", "acho que sim", "com certeza", "tudo bem",
        "tudo certo", "ta bom", "ta bem", "ta certo", "ta ok", "ta liberado", "pode ser",
        "isso mesmo", "pode deixar", "uhum", "aham", "afirmativo", "pois nao",
    )]
    + [(p, _NEG) for p in _phrases(
        "nem pensar", "de jeito nenhum", "de jeito algum", "de forma nenhuma",
        "de forma alguma", "de maneira nenhuma", "de maneira alguma", "de modo nenhum",
        "de jeito maneira", "manda embora", "mandar embora", "manda ir embora",
        "pode mandar embora", "manda ele embora", "manda ela embora", "manda eles embora",
        "manda ele ir embora", "manda ela ir embora", "pode ir embora", "pede pra ir embora",
        "pede para ir embora", "vai embora", "ir embora", "pode dispensar", "dispensa",
        "claro que nao", "logico que nao", "acho que nao", "melhor nao", "agora nao",
        "hoje nao", "recuso", "nego", "proibido", "negativo", "manda voltar",
        "deus me livre", "to fora", "sai fora", "vaza",
    )]
    + [(p, _NEUTRAL) for p in _phrases(
        "nao sei", "sei la", "talvez", "depende", "perai", "espera", "um momento",
        "um minuto", "calma", "deixa eu ver", "deixa ver", "vou ver", "pode esperar",
        "pode aguardar", "manda esperar", "manda aguardar", "pede pra esperar",
        "pede para esperar",
    )],  # fmt: skip
    key=lambda item: -len(item[0]),
)
# A whole answer that is only one of these asks what was said ("oi?", "quê?", "alô?").
_WHO_ALONE = frozenset({"que", "oi", "ue", "ahn", "han", "hum", "alo", "ola", "e", "o que"})
# Words leaning towards yes. They never authorise by themselves (only L{is_plain_yes} does):
# they tell a refusal ("não") from a mixed answer ("não, pode subir"), which is asked again.
_POSITIVE = frozenset(
    (
        "sim pode podem autorizo autorizado autorizada autoriza autorizar libera liberar"
        " liberado liberada liberem claro ok okay beleza blz certo positivo isso aceito"
        " confirmo confirmado confirma sobe subir suba entra entrar manda mandar deixa"
        " deixar abre abrir esperando aguardando conheco conhece bora show perfeito otimo"
        " tranquilo"
    ).split()
    + [_POS]
)
# "num" is the colloquial "não" ("num pode", "num deixa entrar").
_SCOPE_NEGATORS = frozenset({"nao", "num", "nem", "nunca", "jamais"})
_DECISION_NEGATORS = _SCOPE_NEGATORS | {"nada", "ninguem", _NEG}
# How far back a negation reaches over a positive word in the same clause:
# "não pode subir", "não é pra subir", "não estou esperando ninguém".
_NEGATION_REACH = 3


def _mark(words: Sequence[str]) -> list[str]:
    marked: list[str] = []
    i = 0
    while i < len(words):
        for phrase, marker in _IDIOMS:
            if tuple(words[i : i + len(phrase)]) == phrase:
                marked.append(marker)
                i += len(phrase)
                break
        else:
            marked.append(words[i])
            i += 1
    return marked


def _lean(tokens: Sequence[_Token]) -> Decision:
    """
    Which way an answer that is not a plain yes leans: L{Decision.DENIED},
    L{Decision.WHO} or L{Decision.UNCLEAR} — never L{Decision.AUTHORIZED}.
    """
    words = [t.word for t in tokens if t.is_word]
    if " ".join(words) in _WHO_ALONE:
        return Decision.WHO

    # Keep punctuation as clause boundaries ("|") for negation scope.
    stream: list[str] = []
    clause: list[str] = []
    for token in tokens:
        if token.is_word:
            clause.append(token.word)
        elif clause:
            stream.extend(_mark(clause))
            stream.append("|")
            clause = []
    stream.extend(_mark(clause))

    last_who = max((k for k, w in enumerate(stream) if w == _WHO), default=None)
    if last_who is not None:
        stream = stream[last_who + 1 :]

    positive = negative = 0
    for k, word in enumerate(stream):
        if word in _DECISION_NEGATORS:
            negative += 1
        elif word in _POSITIVE:
            before = stream[max(0, k - _NEGATION_REACH) : k]
            if "|" in before:
                before = before[len(before) - before[::-1].index("|") :]
            # Post-negation reaches back over a run of positive words ("pode subir não",
            # "tô esperando ninguém"), and over the whole clause it ends ("abre o portão não").
            after = next((w for w in stream[k + 1 :] if w not in _POSITIVE), None)
            rest = stream[k + 1 :]
            clause_end = rest[: rest.index("|")] if "|" in rest else rest
            if (
                any(w in _DECISION_NEGATORS for w in before)
                or after in _DECISION_NEGATORS
                or (clause_end and clause_end[-1] in _SCOPE_NEGATORS)
            ):
                continue  # counted through the negation itself
            positive += 1

    if last_who is not None and not positive and not negative:
        return Decision.WHO
    if negative and not positive:
        return Decision.DENIED
    return Decision.UNCLEAR


def classify_decision(text: str) -> Decision:
    """
    Classify the resident's answer to "você autoriza a entrada?".

    The contract: a false "authorized" lets a stranger in, a question asked again costs a few
    seconds. So:
      1. L{Decision.AUTHORIZED} only for a plain yes (L{is_plain_yes}): an entry verb
         ("pode subir", "pode entrar", "manda subir", "deixa entrar", "pode liberar",
         "libera", "pode abrir") or a plain "sim" / "autorizo" / "pode" / "tá liberado",
         with harmless fillers ("ah", "é", "olha", "então", "bom", "claro", "imagina",
         "beleza", "ok", "tá") and an opening greeting allowed around it — and nothing else.
         An allowlist: a reply not known to be a yes never authorises. So no negation
         anywhere ("não", "num", "nem", "nada", post-negation "pode subir não"), no question
         ("?" or a question word), no deferral ("amanhã", "outro dia", "depois", "mais
         tarde", "outra hora"), no condition ("se", "só se", "mas", "desde que", "caso"),
         no instruction to leave a parcel or send the visitor away ("deixa na portaria",
         "manda embora", "manda voltar", "pode desligar", "deixa pra lá", "pode
         esquecer"), no sarcasm ("e eu sou o Papa", "tá maluco", "só que não"), no hedge
         ("acho", "talvez", "sei lá", "pode ser").
      2. Someone who picked up and has not heard the message ("Alô? Pode falar", "Pois
         não?", "Oi, tudo bem?", "Sim?"), or asks who it is ("quem é?", "não entendi",
         "o quê?"): L{Decision.WHO}, answered with the detail and the question again.
      3. A clear refusal — negative words only, negation-aware on words, never substrings
         ("não", "num pode", "pode subir não", "nem pensar", "manda embora", "não
         conheço"): L{Decision.DENIED}.
      4. Everything else — a yes with a reservation, mixed yes and no ("não, pode subir"),
         hedges, deferrals, sarcasm, nothing said: L{Decision.UNCLEAR}, asked again (then
         the call ends as "no_decision"). Between asking again and refusing, the rules ask.
    """
    tokens = _tokenize(text)
    if not any(t.is_word for t in tokens):
        return Decision.UNCLEAR
    if is_plain_yes(text):
        return Decision.AUTHORIZED
    if _only_go_ahead(tokens):
        return Decision.WHO
    return _lean(tokens)


def classify_dtmf(digit: str) -> Decision:
    """
    The resident's keypad answer: 1 authorises, 2 refuses, anything else is unclear.
    """
    digit = (digit or "").strip()
    if digit == "1":
        return Decision.AUTHORIZED
    if digit == "2":
        return Decision.DENIED
    return Decision.UNCLEAR
