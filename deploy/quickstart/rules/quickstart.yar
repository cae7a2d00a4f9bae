// Rules for the quick start: harmless markers that show a detection end to end.

rule Vedette_Quickstart_Marker
{
    meta:
        description = "Vedette quick-start test marker"
        author = "Vedette"
        score = 50
    strings:
        $marker = "VEDETTE-QUICKSTART-TEST"
    condition:
        $marker
}

rule EICAR_Test_File
{
    meta:
        description = "EICAR anti-malware test file"
        reference = "https://www.eicar.org/download-anti-malware-testfile/"
        score = 70
    strings:
        $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    condition:
        $eicar
}
