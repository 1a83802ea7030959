from twisted.application.service import ServiceMaker

audiosocket = ServiceMaker(
    "audiosocket", "audiosocket.tap", "AI virtual doorman for Asterisk AudioSocket", "audiosocket"
)
